"""The comparison table as the terminal shows it: one line per step time, the rows a user compares always in.

The comparison table of a run has a row per method, and a dozen heuristics often find the
same placement: printed row by row, the first eight lines could all be one placement and hide
the rows the final line compares with (the single device, DDP, the pipelines). Here rows with
the same figures share a line, and the lines that hold placer's own rows, the single device,
DDP or the fastest pipeline are shown whatever their rank. Report.md keeps every row.

Example:

>>> import pandas as pd
>>> table = pd.DataFrame({"method": ["heft", "single", "placer (moves)", "ddp"],
...                       "step_time": [0.002, 0.002, 0.002, 0.003], "speedup_vs_single": [1.0, 1.0, 1.0, 0.67],
...                       "fits": [True] * 4, "source": ["measured"] * 4})
>>> print("\\n".join(comparison_lines(table)))
method                        step (ms)  speed-up  fits  source
heft, placer (moves), single      2.000      1.00  yes   measured
ddp                               3.000      0.67  yes   measured
"""

from __future__ import annotations

import math

import pandas as pd

from placer.report.compare import ONE_PROCESS_KIND, is_placer_method

#: Lines of the terminal table before only the always-shown ones follow.
TOP_LINES = 8
#: Characters of method names written out on a shared line; the names past it are counted.
NAME_WIDTH = 40


def _always_shown(table: pd.DataFrame) -> set[str]:
    """The methods a reader compares the winner with: placer's own rows, the single device,
    DDP, the one-process reference and the fastest fitting pipeline."""
    methods = {str(m) for m in table["method"] if is_placer_method(m) or m in ("single", "ddp")}
    kind = table["kind"] if "kind" in table else pd.Series("", index=table.index)
    methods |= {str(m) for m in table.loc[kind == ONE_PROCESS_KIND, "method"]}
    pipes = table[(kind == "pipeline") & table["fits"].astype(bool) & table["step_time"].notna()]
    if not pipes.empty:
        methods.add(str(pipes.sort_values("step_time", kind="stable")["method"].iloc[0]))
    return methods


def _line_key(row: pd.Series) -> tuple[object, ...]:
    """What rows must share to share a line: the figures printed and what they are."""
    step = row["step_time"]
    return (None if pd.isna(step) else float(step), str(row.get("kind", "")), bool(row["fits"]), str(row["source"]),
            bool(row.get("set_aside", False)))


def _names(methods: list[str], shown: set[str], winner: bool) -> str:
    """The ``methods`` of one line: on the ``winner``'s line the table's first (the winner),
    then placer's rows, the other always-shown ones and the rest, written out up to
    :data:`NAME_WIDTH` characters and the others counted."""
    head = methods[:1] if winner else []
    first = head + sorted(methods[len(head):], key=lambda m: (not is_placer_method(m), m not in shown))
    text, n = first[0], 1
    while n < len(first) and len(text) + 2 + len(first[n]) <= NAME_WIDTH:
        text, n = f"{text}, {first[n]}", n + 1
    return text + (f" +{len(first) - n}" if n < len(first) else "")


def _why_none(note: object) -> str:
    """The reason a row has no placement, as its note's first clause gives it (the rest of the
    note, such as how many candidates were tried, stays in report.md).

    >>> _why_none("no pipeline x DDP hybrid on 2 devices: one needs 4 devices; 600 pipelines simulated")
    'none: no pipeline x DDP hybrid on 2 devices: one needs 4 devices'
    """
    first = str(note).split(";")[0].strip() if isinstance(note, str) and note.strip() else "no fitting placement"
    return f"none: {first}"


def comparison_lines(table: pd.DataFrame, top: int = TOP_LINES) -> list[str]:
    """The terminal's comparison table: ``table``'s rows in its order, rows with the same step
    time (and kind, fit, source) on one line, the first ``top`` lines and every later one that
    holds an always-shown method (:func:`_always_shown`); a last line counts the rows left to
    report.md."""
    shown = _always_shown(table)
    groups: dict[tuple[object, ...], list[int]] = {}
    methods = [str(m) for m in table["method"]]
    for pos in range(len(table)):
        key = _line_key(table.iloc[pos])
        # Rows without a step time (no placement) never share a line: each says its own "no".
        groups.setdefault(key if key[0] is not None else ("row", pos), []).append(pos)
    lines = list(groups.values())
    kept = [rows for n, rows in enumerate(lines) if n < top or any(methods[i] in shown for i in rows)]
    cells = []
    for rows in kept:
        r = table.iloc[rows[0]]
        step = "-" if pd.isna(r["step_time"]) else f"{r['step_time'] * 1e3:10.3f}"
        speed = r.get("speedup_vs_single", math.nan)
        speed_text = "-" if pd.isna(speed) else f"{speed:8.2f}"
        aside = ", set aside (changes the numerics)" if bool(r.get("set_aside", False)) else ""
        source = "-" if pd.isna(r["source"]) or not str(r["source"]) else str(r["source"])
        fits = "yes" if r["fits"] else "no "
        if pd.isna(r["step_time"]):
            # No placement to time: "fits: no" would read as a memory verdict; say why instead.
            fits, source = "-", _why_none(r.get("note"))
        cells.append((_names([methods[i] for i in rows], shown, rows[0] == 0), step, speed_text, fits,
                      source + aside))
    width = max([len("method"), *(len(c[0]) for c in cells)])
    out = [f"{'method':<{width}}  {'step (ms)':>10}  {'speed-up':>8}  fits  source"]
    out += [f"{n:<{width}}  {s:>10}  {v:>8}  {f:<4}  {src}" for n, s, v, f, src in cells]
    left = sum(len(rows) for rows in lines) - sum(len(rows) for rows in kept)
    if left:
        out.append(f"({left} more row(s) in report.md)")
    return out
