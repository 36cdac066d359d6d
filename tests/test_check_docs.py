"""scripts/check_docs.py: documented commands parse with the real CLI, stated defaults are the
code's, printed counts are recomputed and search results are dated — through the script's own
``main`` (what CI runs; in this process, since a fresh interpreter per case cost ~3 s each)."""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import io
import os
import sys
import textwrap
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "check_docs.py"


@functools.cache
def _script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_docs_script", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _check(tmp_path: Path, text: str, *options: str) -> tuple[int, list[str]]:
    doc = tmp_path / "doc.md"
    doc.write_text(textwrap.dedent(text))
    out = io.StringIO()
    here = Path.cwd()
    os.chdir(tmp_path)  # the script names files relative to where it runs
    try:
        with contextlib.redirect_stdout(out):
            code = _script().main([*options, str(doc)])
    finally:
        os.chdir(here)
    lines = out.getvalue().strip().splitlines()
    assert lines[-1] == f"docs: {len(lines) - 1} problem(s)"
    return code, lines[:-1]


def test_a_bad_option_and_a_stale_default_are_both_flagged(tmp_path):
    code, problems = _check(tmp_path, """\
        # Example

        ```bash
        python -m placer optimize zoo:rnnlm --cluster 4xK40 --bugdet 1m
        ```

        The default budget is 5 minutes.
        """, "--no-models")
    assert code == 1
    assert len(problems) == 2, problems
    assert problems[0].startswith("doc.md:4: `python -m placer optimize zoo:rnnlm --cluster 4xK40 --bugdet 1m`: ")
    assert "unrecognized arguments: --bugdet 1m" in problems[0]
    assert problems[1].startswith("doc.md:7: states a default budget of 5 minutes; the code's is ")


def test_commands_and_defaults_that_match_the_code_pass(tmp_path):
    from placer.search.budget import DEFAULT_BUDGET, parse_budget

    minutes = parse_budget(DEFAULT_BUDGET).seconds / 60
    code, problems = _check(tmp_path, f"""\
        ```bash
        # a comment, then two commands on one line
        bash scripts/setup.sh && python -m placer optimize graphs/zoo/nmt.py --out out/nmt \\
            --budget 20k --seed 1
        $ placer presets
        ```

        With the {minutes:g}-minute default budget; see `placer optimize --measure-timeout` and
        `python -m placer graph MODEL --json`. A table row `placer (moves)` is no command.
        """, "--no-models")
    assert (code, problems) == (0, [])


def test_unknown_subcommands_options_budgets_and_presets_are_each_flagged(tmp_path):
    code, problems = _check(tmp_path, """\
        ```
        placer optimise model.py
        placer optimize model.py --budget fast
        placer optimize model.py --cluster 9xNOPE
        ```

        Inline: `placer show placement.json --colour` and `placer deploy now`.
        The default cluster is `8xV100`; the default agent is `hierarchical`.
        """, "--no-models")
    assert code == 1
    text = "\n".join(problems)
    assert "doc.md:2:" in text and "invalid choice: 'optimise'" in text
    assert "doc.md:3:" in text and "--budget 'fast'" in text
    assert "doc.md:4:" in text and "--cluster '9xNOPE' is not a preset" in text
    assert "`placer show` has no option --colour" in text
    assert "unknown subcommand 'deploy'" in text
    assert "default cluster is '8xV100'" in text and "default agent is 'hierarchical'" in text
    assert len(problems) == 7, problems


def test_search_results_need_a_date_and_printed_counts_are_recomputed(tmp_path):
    model = tmp_path / "tiny.py"
    model.write_text(textwrap.dedent("""\
        import torch
        from torch import nn


        def get_model():
            return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))


        def get_example_inputs():
            return (torch.randn(4, 8),)
        """))
    code, problems = _check(tmp_path, f"""\
        ```
        $ python -m placer optimize {model} --out out/tiny
        placer: tiny: 999 ops in 1 groups; 5 devices (4xK40)
        best: single, 0.100 ms per step (simulated)
        ```

        No date anywhere near.
        """)
    assert code == 1
    assert len(problems) == 2, problems
    assert problems[0].startswith("doc.md:2: search results under a placer command carry no date")
    assert problems[1].startswith(f"doc.md:3: says 999 ops in 1 groups for {model}; capture and grouping give ")
