"""The module map of docs/contracts.md: one line per module, from each module's docstring.

    python scripts/module_map.py            # print the map
    python scripts/module_map.py --write    # rewrite the map section of docs/contracts.md
    python scripts/module_map.py --check    # exit 1 when docs/contracts.md's map is stale (CI)

The map sits between the ``<!-- module map -->`` and ``<!-- end module map -->`` markers;
each line is the module path and the first sentence of its docstring, so the map follows
the code instead of drifting from it.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "contracts.md"
BEGIN, END = "<!-- module map -->", "<!-- end module map -->"
PACKAGES = ("graphs", "envs", "placer")


#: A full stop followed by space ends a sentence, except after these abbreviations.
_ABBREVIATIONS = ("al", "e.g", "i.e", "vs", "cf", "etc")
_SENTENCE_END = re.compile(r"(?<!\w)(?:" + "|".join(re.escape(a) for a in _ABBREVIATIONS) + r")\.\s|(\.)\s")


def first_sentence(text: str) -> str:
    """The docstring's first sentence, on one line.

    >>> first_sentence("GPT-2 (Radford et al. 2019). More text.")
    'GPT-2 (Radford et al. 2019).'
    """
    para = " ".join(text.strip().split("\n\n")[0].split()) + " "
    for match in _SENTENCE_END.finditer(para):
        if match.group(1):
            return para[: match.start(1)] + "."
    return para.strip()


def module_lines(root: Path = ROOT) -> list[str]:
    """``| `module` | summary |`` rows for every module of the three packages, in path order."""
    rows = []
    for package in PACKAGES:
        for path in sorted((root / package).rglob("*.py")):
            if "__pycache__" in path.parts or path.name == "__main__.py":
                continue
            parts = path.relative_to(root).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            rows.append(f"| `{name}` | {first_sentence(doc) if doc else '(no docstring)'} |")
    return rows


def render(root: Path = ROOT) -> str:
    """The map section, markers included."""
    lines = [BEGIN, "| module | what it holds |", "|---|---|", *module_lines(root), END]
    return "\n".join(lines)


def current(doc_text: str) -> str | None:
    """The map section as it stands in ``doc_text`` (None without markers)."""
    if BEGIN not in doc_text or END not in doc_text:
        return None
    start = doc_text.index(BEGIN)
    return doc_text[start:doc_text.index(END) + len(END)]


def main(argv: list[str]) -> int:
    fresh = render()
    text = DOC.read_text()
    if "--write" in argv:
        old = current(text)
        DOC.write_text(text.replace(old, fresh) if old else text.rstrip() + "\n\n## Module map\n\n" + fresh + "\n")
        return 0
    if "--check" in argv:
        if current(text) != fresh:
            print("docs/contracts.md: the module map is stale; run python scripts/module_map.py --write")
            return 1
        print("module map: up to date")
        return 0
    print(fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
