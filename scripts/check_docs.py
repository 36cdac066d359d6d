"""Check that the documentation has not drifted from the code; one line per problem, exit 1.

What it checks in README.md and docs/*.md (or the Markdown files given):

* every ``python -m placer ...`` / ``placer ...`` command in a shell code block parses with
  the real CLI parser (:func:`placer.cli.main.build_parser`): an unknown subcommand or
  option, a missing argument or a bad value fails; a ``--budget`` must parse as a budget
  and a ``--cluster`` name must be a preset (or a file that exists);
* every such command quoted inline (```placer optimize --devices```) names a real
  subcommand and only options that subcommand has (fragments: not fully parsed);
* defaults stated in prose — the default budget, cluster, agent and baselines — equal the
  code's (:data:`placer.search.budget.DEFAULT_BUDGET`,
  :data:`placer.optimizing.config.DEFAULT_CLUSTER`, ``DEFAULT_AGENT``, ``DEFAULT_BASELINES``);
* "N ops in M groups" printed under a ``placer optimize`` / ``placer graph`` command is
  what :func:`graphs.pipeline.prepare` gives for that model (capture, op profile, grouping:
  seconds for the small zoo; no search); ``--no-models`` skips this;
* figures that need a search (a block printing ``ms per step`` or a results table under a
  placer command) cannot be rerun here, so the block, or the paragraph right before or
  after it, must carry the date of the run (``2026-12-05``): stale results stay visibly dated.

Usage: ``python3 scripts/check_docs.py [--no-models] [FILE.md ...]``
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SHELL_LANGS = {"", "bash", "sh", "shell", "console", "text"}
_FENCE = re.compile(r"^(\s*)(```+)\s*([\w+-]*)\s*$")
_PLACER = re.compile(r"^(?:python3?\s+-m\s+placer|placer)\s+([a-z][\w-]*)(\s.*)?$")
_ENV_ASSIGN = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=\S*$")
_COUNTS = re.compile(r"\b([\d,]+) ops in ([\d,]+) groups\b")
_DATE = re.compile(r"\b20\d\d-[01]\d-[0-3]\d\b")
_SEARCH_OUTPUT = re.compile(r"ms per step|^\s*method\s+step \(ms\)", re.M)
_NUMBERS = {"one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8,
            "nine": 9, "ten": 10, "fifteen": 15, "twenty": 20, "thirty": 30, "ninety": 90}
_UNITS = {"s": 1, "sec": 1, "second": 1, "seconds": 1, "m": 60, "min": 60, "mins": 60, "minute": 60,
          "minutes": 60, "h": 3600, "hour": 3600, "hours": 3600}
_DURATION = r"(\d+(?:\.\d+)?|" + "|".join(_NUMBERS) + r")[\s-]*(seconds?|secs?|s|minutes?|mins?|m|hours?|h)\b"
#: Ways the prose states the default budget; group 1 and 2 are the duration's number and unit.
_BUDGET_STATEMENTS = [
    re.compile(_DURATION + r"\s+default\s+(?:search\s+)?budget", re.I),
    re.compile(r"default\s+(?:search\s+)?budget\s*(?:is|of|:|=)?\s*(?:\*\*|`)?" + _DURATION, re.I),
    re.compile(r"budget\s+defaults?\s+(?:to|is)\s+(?:\*\*|`)?" + _DURATION, re.I),
    re.compile(r"--budget\b[^\n]{0,80}?\bdefault:?\s+(?:\*\*|`)?" + _DURATION, re.I),
]
_CLUSTER_STATEMENTS = [
    re.compile(r"default\s+cluster\s*(?:is|:)?\s*(?:the\s+)?`?([\w.-]*\dx[\w.-]+)`?", re.I),
    re.compile(r"`?([\w.-]*\dx[\w.-]+)`?\s+(?:is|as)\s+the\s+default\s+cluster", re.I),
]
_AGENT_STATEMENTS = [
    re.compile(r"default\s+agent\s*(?:is|:)?\s*(?:the\s+)?`([\w-]+)`", re.I),
    re.compile(r"--agent\b[^\n]{0,60}?\bdefault:?\s+`?([\w-]+)`?", re.I),
]
_BASELINE_STATEMENTS = [
    re.compile(r"default\s+baselines?\s*(?:are|is|:|\()?\s*`([\w]+(?:\s*,\s*[\w]+)+)`", re.I),
]


@dataclass(frozen=True)
class Block:
    """A fenced code block: its language, first line number (1-based, of the first content line), text."""

    lang: str
    line: int
    text: str


@dataclass(frozen=True)
class Command:
    """A placer command quoted in a document: where, its words after ``placer``, and the block it is in."""

    line: int
    argv: list[str]
    shown: str


def split_markdown(text: str) -> tuple[list[Block], str]:
    """The fenced code blocks of ``text`` and the prose with those blocks blanked (line numbers kept)."""
    blocks: list[Block] = []
    prose: list[str] = []
    lines = text.split("\n")
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if m is None:
            prose.append(lines[i])
            i += 1
            continue
        fence, lang, start = m.group(2), m.group(3).lower(), i + 1
        j = start
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        indent = len(m.group(1))
        body = [ln[indent:] if ln[:indent].strip() == "" else ln for ln in lines[start:j]]
        blocks.append(Block(lang, start + 1, "\n".join(body)))
        prose.extend([""] * (min(j, len(lines) - 1) - i + 1))
        i = j + 1
    return blocks, "\n".join(prose)


def _logical_lines(block: Block) -> Iterator[tuple[int, str]]:
    """(line number, line) with backslash continuations joined and ``$ `` prompts removed."""
    pending, first = "", 0
    for offset, raw in enumerate(block.text.split("\n")):
        line = raw.rstrip()
        if not pending:
            first = block.line + offset
            line = line.lstrip()
            if line.startswith("$ "):
                line = line[2:]
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        yield first, pending + line
        pending = ""
    if pending:
        yield first, pending


def _placer_words(segment: str) -> list[str] | None:
    """The words after ``placer`` when ``segment`` is a placer command, else None."""
    try:
        words = shlex.split(segment, comments=True)
    except ValueError:
        return None
    while words and _ENV_ASSIGN.match(words[0]):
        words = words[1:]  # PYTHONPATH=. placer ...
    text = " ".join(words)
    m = _PLACER.match(text)
    if m is None:
        return None
    prefix = 3 if words[0].startswith("python") else 1
    return words[prefix:]


def block_commands(block: Block) -> list[Command]:
    """The placer commands of a shell code block (``a && b``, ``a; b`` and pipes split)."""
    found = []
    for line_no, line in _logical_lines(block):
        for segment in re.split(r"&&|\|\||;|\|", line):
            words = _placer_words(segment.strip())
            if words is not None:
                found.append(Command(line_no, words, segment.strip()))
    return found


def inline_commands(prose: str) -> list[Command]:
    """Placer commands quoted as inline code in prose (a span may wrap over a line break)."""
    found = []
    for m in re.finditer(r"`([^`\n]+(?:\n[^`\n]+)?)`", prose):
        span = " ".join(m.group(1).split())
        words = _placer_words(span)
        if words is not None:
            found.append(Command(prose.count("\n", 0, m.start()) + 1, words, span))
    return found


# ----------------------------------------------------------------------------- the CLI


def _subparsers(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def _parse_error(parser: argparse.ArgumentParser, argv: Sequence[str]) -> tuple[str | None, argparse.Namespace | None]:
    """argparse's own error line for ``argv`` (None when it parses) and the parsed arguments."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            return None, parser.parse_args(list(argv))
        except SystemExit as exc:
            if not exc.code:
                return None, None  # --help
    lines = [ln for ln in err.getvalue().strip().splitlines() if ln.strip()]
    message = lines[-1] if lines else "does not parse"
    return re.sub(r"^[\w ]+: error: ", "", message), None


def check_full_command(parser: argparse.ArgumentParser, cmd: Command) -> list[str]:
    """Problems of a command in a code block: it must parse, with a valid budget and cluster."""
    error, args = _parse_error(parser, cmd.argv)
    if error is not None:
        return [error]
    problems = []
    if args is not None and isinstance(getattr(args, "budget", None), str):
        from placer.search.budget import parse_budget

        try:
            parse_budget(args.budget)
        except Exception as exc:  # the parser's own message, whatever its error type
            problems.append(f"--budget {args.budget!r}: {exc}")
    cluster = getattr(args, "cluster", None) if args is not None else None
    if isinstance(cluster, str) and not Path(cluster).suffix:
        from envs.hardware.loading import list_presets

        if cluster not in list_presets():
            problems.append(f"--cluster {cluster!r} is not a preset (presets: {', '.join(list_presets())})")
    return problems


def check_inline_command(parser: argparse.ArgumentParser, cmd: Command) -> list[str]:
    """Problems of an inline fragment: its subcommand must exist and have each ``--option`` it names."""
    subs = _subparsers(parser)
    name = cmd.argv[0] if cmd.argv else ""
    if name not in subs:
        return [f"unknown subcommand {name!r} (subcommands: {', '.join(sorted(subs))})"]
    known = {opt for action in subs[name]._actions for opt in action.option_strings}
    unknown = [w.split("=", 1)[0] for w in cmd.argv[1:] if w.startswith("-") and w.split("=", 1)[0] not in known
               and not re.fullmatch(r"-\d.*", w)]
    return [f"`placer {name}` has no option {opt}" for opt in unknown]


# ----------------------------------------------------------------------------- defaults


def _seconds(number: str, unit: str) -> float:
    value = float(_NUMBERS[number.lower()]) if number.lower() in _NUMBERS else float(number)
    return value * _UNITS[unit.lower()]


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def check_defaults(prose: str) -> list[tuple[int, str]]:
    """Defaults stated in prose that differ from the code's."""
    from placer.optimizing.config import DEFAULT_BASELINES, DEFAULT_CLUSTER
    from placer.search.agents.registry import DEFAULT_AGENT
    from placer.search.budget import DEFAULT_BUDGET, parse_budget

    flat = re.sub(r"[ \t]*\n[ \t]*", " ", prose)  # a statement may wrap over lines
    def line(pos: int) -> int:
        return _line_of(prose, _position_in(prose, flat, pos))

    problems: list[tuple[int, str]] = []
    budget_s = parse_budget(DEFAULT_BUDGET).seconds
    for pattern in _BUDGET_STATEMENTS:
        for m in pattern.finditer(flat):
            stated = _seconds(m.group(1), m.group(2))
            if budget_s is not None and abs(stated - budget_s) > 1e-9:
                problems.append((line(m.start()), f"states a default budget of {m.group(1)} {m.group(2)}; "
                                                  f"the code's is {DEFAULT_BUDGET} (placer.search.budget.DEFAULT_BUDGET)"))
    for pattern in _CLUSTER_STATEMENTS:
        for m in pattern.finditer(flat):
            if m.group(1) != DEFAULT_CLUSTER:
                problems.append((line(m.start()), f"states the default cluster is {m.group(1)!r}; the code's is "
                                                  f"{DEFAULT_CLUSTER!r} (placer.optimizing.config.DEFAULT_CLUSTER)"))
    for pattern in _AGENT_STATEMENTS:
        for m in pattern.finditer(flat):
            if m.group(1) != DEFAULT_AGENT:
                problems.append((line(m.start()), f"states the default agent is {m.group(1)!r}; the code's is "
                                                  f"{DEFAULT_AGENT!r} (placer.search.agents.registry.DEFAULT_AGENT)"))
    for pattern in _BASELINE_STATEMENTS:
        for m in pattern.finditer(flat):
            stated = [b.strip() for b in m.group(1).split(",")]
            if stated != list(DEFAULT_BASELINES):
                problems.append((line(m.start()), f"states the default baselines are {','.join(stated)}; the code's "
                                                  f"are {','.join(DEFAULT_BASELINES)} (DEFAULT_BASELINES)"))
    return problems


def _position_in(original: str, flat: str, pos: int) -> int:
    """The position in ``original`` of the character at ``pos`` in its whitespace-joined ``flat``."""
    i = j = 0
    while j < pos and i < len(original):
        if original[i] == flat[j]:
            i += 1
            j += 1
        elif original[i].isspace():
            i += 1
        else:
            j += 1
    return i


# ----------------------------------------------------------------------------- figures


def _model_of(argv: Sequence[str]) -> tuple[str, dict[str, str], tuple[str, ...]] | None:
    """The model source, model arguments and leaf modules of an ``optimize``/``graph`` command."""
    if not argv or argv[0] not in ("optimize", "graph"):
        return None
    from placer.cli.main import build_parser

    _, args = _parse_error(build_parser(), argv)
    if args is None or getattr(args, "devices", None):
        return None  # real devices profile on them (worker processes): not cheap here
    model_args = dict(kv.split("=", 1) for kv in getattr(args, "model_arg", []) if "=" in kv)
    if getattr(args, "size", None):
        model_args["size"] = args.size
    leaves = tuple(n.strip() for item in getattr(args, "leaf", []) for n in item.split(",") if n.strip())
    return args.model, model_args, leaves


def prepared_counts(model: str, model_args: dict[str, str], leaves: tuple[str, ...]) -> tuple[int, int]:
    """(ops, most groups) of ``model`` as ``placer optimize`` captures and groups it.

    The op count is exact (capture is deterministic). The group count is not: grouping merges
    the ops the CPU profile times under 20 us into a neighbour, so it follows the machine's
    speed and load (the README's 2-layer NMT: 15 groups in its run, 17, 18, 21 and 26 on one
    VM on 2026-12-07 with the same code). What is fixed is the most it can be: the groups of the
    unprofiled graph, where only the mandatory merges and the ops that do no work are made
    (more merges only ever make fewer groups).
    """
    from graphs.pipeline import prepare
    from placer.options import parse_model_args

    source = model if model.startswith("zoo:") else str(ROOT / model)
    args = parse_model_args([f"{k}={v}" for k, v in model_args.items()])
    prepared = prepare(source, model_args=args, profile=False, leaf_modules=leaves)  # grouped unprofiled
    return prepared.captured.graph.number_of_nodes(), len(set(prepared.grouping.op_to_group.values()))


def count_problem(stated: tuple[int, int], model: tuple[str, dict[str, str], tuple[str, ...]]) -> str | None:
    """Why the stated (ops, groups) cannot be what ``placer optimize`` prints today, or None:
    the op count must be exact, the group count between 1 and the most any profile can give
    (:func:`prepared_counts`)."""
    ops, most = prepared_counts(*model)
    if stated[0] == ops and 1 <= stated[1] <= most:
        return None
    return (f"says {stated[0]} ops in {stated[1]} groups for {model[0]}; capture and grouping give {ops} ops "
            f"in 1 to {most} groups today (the count within that follows the machine's op profile)")


def _paragraph_near(lines: list[str], first: int, last: int) -> str:
    """The paragraph right before line ``first`` and right after line ``last`` (1-based)."""
    def walk(i: int, step: int) -> list[str]:
        while 0 <= i < len(lines) and not lines[i].strip():
            i += step
        out = []
        while 0 <= i < len(lines) and lines[i].strip() and not lines[i].lstrip().startswith("```"):
            out.append(lines[i])
            i += step
        return out
    return "\n".join(walk(first - 3, -1) + walk(last + 1, 1))


def check_block_figures(block: Block, commands: list[Command], lines: list[str],
                        models: bool) -> list[tuple[int, str]]:
    """Counts under a placer command are recomputed; search results must be dated."""
    if not commands:
        return []
    problems: list[tuple[int, str]] = []
    body_lines = block.text.split("\n")
    if _SEARCH_OUTPUT.search(block.text) and not _DATE.search(block.text):
        near = _paragraph_near(lines, block.line, block.line + len(body_lines) - 1)
        if not _DATE.search(near):
            problems.append((block.line, "search results under a placer command carry no date of the run "
                                         "(add e.g. '(run on 2026-12-05 ...)' to the block or the paragraph beside it)"))
    for m in _COUNTS.finditer(block.text):
        line = block.line + block.text.count("\n", 0, m.start())
        command = next((c for c in reversed(commands) if c.line <= line), None)
        model = _model_of(command.argv) if command is not None and models else None
        if model is None:
            continue
        problem = count_problem((int(m.group(1).replace(",", "")), int(m.group(2).replace(",", ""))), model)
        if problem is not None:
            problems.append((line, problem))
    return problems


# ----------------------------------------------------------------------------- driver


def check_file(path: Path, models: bool = True) -> list[str]:
    """Every problem of one Markdown file, as ``path:line: message`` lines."""
    from placer.cli.main import build_parser

    parser = build_parser()
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    blocks, prose = split_markdown(text)
    name = path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path
    problems: list[tuple[int, str]] = []
    for block in blocks:
        if block.lang not in SHELL_LANGS:
            continue
        commands = block_commands(block)
        for cmd in commands:
            problems += [(cmd.line, f"`{cmd.shown}`: {p}") for p in check_full_command(parser, cmd)]
        problems += check_block_figures(block, commands, lines, models)
    for cmd in inline_commands(prose):
        problems += [(cmd.line, f"`{cmd.shown}`: {p}") for p in check_inline_command(parser, cmd)]
    problems += check_defaults(prose)
    return [f"{name}:{line}: {message}" for line, message in sorted(problems)]


def default_files() -> list[Path]:
    """README.md and docs/*.md."""
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def main(argv: Sequence[str] | None = None) -> int:
    """Check the files; print one line per problem and a count; 1 when any problem was found."""
    cli = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    cli.add_argument("files", nargs="*", type=Path, help="Markdown files (default: README.md and docs/*.md)")
    cli.add_argument("--no-models", action="store_true", help="skip recomputing op/group counts")
    args = cli.parse_args(argv)
    problems = []
    for path in [p.resolve() for p in args.files] or default_files():
        problems += check_file(path, models=not args.no_models)
    for line in problems:
        print(line)
    print(f"docs: {len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
