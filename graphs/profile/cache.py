"""The on-disk cache of node profiles: one JSON file per model, input shapes and device.

A profile is valid only for the model it was measured on (its fingerprint), the input
shapes it ran with (batch size changes every time), and the exact device (kind plus a
name such as the CPU model or ``torch.cuda.get_device_name``). Those four make the file
name (the caller folds the optimizer's identity into the inputs part: optimizer times
depend on it); the file holds ``{node name: [forward s, backward s, optimizer s | null]}``
plus a small ``meta`` dict (the optimizer's kind and fixed per-step cost). A file that is
unreadable, of another schema (schema 1 had no optimizer times: such files re-profile),
missing a node of the graph, or holding a time that is NaN, infinite or negative is
ignored (with a warning in the log when the file was ours but bad) and overwritten by the
next measurement, never trusted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from graphs.atomic_write import write_text_atomic
from graphs.documents import read_document
from graphs.errors import PlacerError

#: 3: profiles taken with the CPU allocator retaining freed memory (graphs.cpu_allocator);
#: 4: the parameters put back after every optimizer step the profile times (no drift into denormals).
SCHEMA = 4

log = logging.getLogger(__name__)


class _CacheFileError(PlacerError):
    """A profile cache file that cannot be trusted (never raised past :meth:`ProfileCache.load`)."""


def _is_time(value: Any) -> bool:
    # NaN or a negative time (a clock that went backwards, a hand-edited file) would make
    # the simulator's step times meaningless; bool is an int to json but not a time.
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0


def _stale(reason: object) -> None:
    log.warning("profile cache not used, re-profiling: %s", reason)


#: One node's cached times: forward, backward and optimizer-update seconds (None: not timed).
NodeTimes = tuple[float, float, float | None]
ENV_VAR = "PLACER_CACHE_DIR"


def default_cache_dir() -> Path:
    """``$PLACER_CACHE_DIR`` when set, else ``~/.cache/placer/profiles``."""
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "placer" / "profiles"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: torch.device) -> str:
    """Human-readable name of the physical device: the CPU model, or the CUDA device's name."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return _cpu_model()


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return [list(value.shape), str(value.dtype)]
    if isinstance(value, (list, tuple)):
        return [_describe(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _describe(v) for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))}
    return repr(value)


def inputs_key(example_inputs: Sequence[Any]) -> str:
    """Short stable hash of the example inputs' shapes, dtypes and non-tensor values."""
    text = json.dumps(_describe(list(example_inputs)), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:60] or "device"


class ProfileCache:
    """Reads and writes profile files under one directory (created on first write)."""

    def __init__(self, cache_dir: str | os.PathLike | None = None) -> None:
        self.root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def path(self, fingerprint: str, inputs: str, kind: str, name: str) -> Path:
        """File of one (model, input shapes, device) profile."""
        name_hash = hashlib.sha256(name.encode()).hexdigest()[:8]
        return self.root / f"{_slug(fingerprint)[:40]}-{inputs}-{kind}-{_slug(name)}-{name_hash}.json"

    def load(self, fingerprint: str, inputs: str, kind: str, name: str,
             nodes: Iterable[str]) -> tuple[dict[str, NodeTimes], dict[str, Any]] | None:
        """The cached ``({node: (fwd, bwd, opt)}, meta)``, or None when absent, stale or unreadable."""
        file = self.path(fingerprint, inputs, kind, name)
        if not file.exists():
            return None
        try:
            data = read_document(file, _CacheFileError, "profile cache file", fmt="json")
        except _CacheFileError as exc:
            _stale(exc)
            return None
        if not isinstance(data, dict) or data.get("schema") != SCHEMA or data.get("fingerprint") != fingerprint \
                or data.get("device_kind") != kind or data.get("device_name") != name:
            return None  # another schema or another key's file: not an error, just not ours
        stored = data.get("nodes")
        meta = data.get("meta")
        if not isinstance(stored, dict) or not isinstance(meta, dict):
            _stale(f"{file} lacks its nodes or meta")
            return None
        result: dict[str, NodeTimes] = {}
        for node in nodes:
            triple = stored.get(node)
            if not (isinstance(triple, list) and len(triple) == 3
                    and all(_is_time(x) for x in triple[:2]) and (triple[2] is None or _is_time(triple[2]))):
                _stale(f"{file} holds {triple!r} for node {node!r}; expected "
                       "[forward s, backward s, optimizer s or null], each a finite non-negative number")
                return None
            result[node] = (float(triple[0]), float(triple[1]), None if triple[2] is None else float(triple[2]))
        return result, meta

    def store(self, fingerprint: str, inputs: str, kind: str, name: str,
              times: dict[str, NodeTimes], meta: dict[str, Any] | None = None) -> Path:
        """Write the profile atomically (a concurrent reader sees the old file or the new one)."""
        file = self.path(fingerprint, inputs, kind, name)
        payload = {"schema": SCHEMA, "fingerprint": fingerprint, "inputs": inputs, "device_kind": kind,
                   "device_name": name, "torch": torch.__version__,
                   "meta": dict(meta or {}), "nodes": {n: [f, b, o] for n, (f, b, o) in times.items()}}
        return write_text_atomic(file, json.dumps(payload))
