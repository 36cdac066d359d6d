"""Reading JSON and YAML documents a user hands placer, refusing bad ones in one line.

Every input file (placement files, cluster specs, graph files, the profile cache) goes
through :func:`read_document`, so all of them refuse the same things the same way:

* bytes that are not UTF-8 text (the message gives the offset of the first bad byte);
* nesting deeper than :data:`MAX_DEPTH` (``[[[[…]]]]`` 200,000 deep makes the parsers
  recurse until Python's stack limit, a ``RecursionError`` traceback otherwise);
* a key given twice in one mapping (JSON and YAML parsers silently keep the last one,
  so a typo'd spec would quietly lose a setting);
* syntax errors, with the line and column.

The error type is the caller's (a :class:`graphs.errors.PlacerError` subclass), so each
loader keeps its own error class and the CLI prints the message and exits with status 2.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import yaml

from graphs.errors import PlacerError

__all__ = ["MAX_DEPTH", "parse_document", "read_document"]

#: Deepest nesting accepted. Placer's own files nest 4 levels; generous for hand-written specs.
MAX_DEPTH = 64


def _nesting_depth(text: str) -> int:
    """Deepest bracket nesting of JSON or flow-style YAML, outside strings (a linear scan, no recursion)."""
    depth = deepest = 0
    quote = None
    escaped = False
    for ch in text:
        if quote is not None:
            if escaped:
                escaped = False
            elif ch == "\\" and quote == '"':
                escaped = True
            elif ch == quote:
                quote = None
            continue
        if ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
        elif ch in "]}":
            depth = max(depth - 1, 0)
    return deepest


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader, refusing a key given twice in one mapping."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode, deep: bool = False) -> Any:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            duplicate = key in seen
            seen.add(key)
        except TypeError:  # an unhashable key: construct_mapping refuses it with a proper message
            continue
        if duplicate:
            raise yaml.constructor.ConstructorError(
                None, None, f"the key {key!r} is given twice (line {key_node.start_mark.line + 1})",
                key_node.start_mark)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out


def parse_document(text: str, fmt: str, where: str, error: type[PlacerError]) -> Any:
    """Parse ``text`` as ``fmt`` (``"json"`` or ``"yaml"``), raising ``error`` with a one-line message."""
    depth = _nesting_depth(text)
    if depth > MAX_DEPTH:
        raise error(f"{where} nests {depth:,} levels deep; expected at most {MAX_DEPTH} (is it the right file?)")
    try:
        if fmt == "json":
            return json.loads(text, object_pairs_hook=_unique_pairs)
        # YAML's block style nests by indentation, which the bracket scan does not see.
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except json.JSONDecodeError as exc:
        raise error(f"{where} is not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise error(f"{where} is not valid YAML{at}: {problem}") from None
    except ValueError as exc:  # a duplicate key (json), a number too large to read
        raise error(f"{where} is not a valid JSON document: {exc}") from None
    except RecursionError:
        raise error(f"{where} nests too deeply to read; expected at most {MAX_DEPTH} levels") from None


def read_document(path: str | os.PathLike, error: type[PlacerError], what: str = "file",
                  fmt: str | None = None) -> Any:
    """Read a JSON or YAML file (``fmt``, default from the suffix: ``.json`` is JSON, else YAML).

    Raises ``error`` for a file that cannot be read, is not UTF-8, nests too deeply, gives
    a key twice or does not parse; the message names ``what`` and the path.
    """
    p = Path(path)
    where = f"{what} {str(p)!r}"
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise error(f"cannot read {where}: {exc.strerror or exc}") from None
    if fmt is None:
        fmt = "json" if p.suffix.lower() == ".json" else "yaml"
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        # What this read accepts: a placement file (fmt="json") said "JSON or YAML" and then
        # refused a YAML one as "not valid JSON".
        accepted = "a JSON text file" if fmt == "json" else "a YAML or JSON text file"
        raise error(f"{where} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start}); "
                    f"expected {accepted}") from None
    if text.startswith("\ufeff"):
        text = text[1:]  # a byte-order mark some editors write
    return parse_document(text, fmt, where, error)
