"""The library logs, the CLI prints: what reaches the terminal and where, and nothing prints outside the CLI."""

from __future__ import annotations

import ast
import io
import logging
from pathlib import Path

from placer.cli.logs import printed_logs

ROOT = Path(__file__).resolve().parent.parent


def test_printed_logs_sends_info_to_out_and_warnings_to_err_then_removes_its_handlers():
    logger = logging.getLogger("placer")
    before = list(logger.handlers)
    out, err = io.StringIO(), io.StringIO()
    with printed_logs(logging.INFO, out, err):
        logging.getLogger("placer.optimizing.stages").info("net: %d ops", 14)
        logging.getLogger("placer.search").debug("not shown")
        logging.getLogger("placer.integrations.loop").warning("cache ignored")
    logging.getLogger("placer.optimizing.stages").info("after the command")
    assert out.getvalue() == "placer: net: 14 ops\n"
    assert err.getvalue() == "placer: cache ignored\n"
    assert logger.handlers == before


def test_quiet_printing_keeps_warnings_only():
    out, err = io.StringIO(), io.StringIO()
    with printed_logs(logging.WARNING, out, err):
        logging.getLogger("placer.optimizing.stages").info("summary")
        logging.getLogger("placer.optimizing.stages").warning("no baseline fits")
    assert out.getvalue() == "" and err.getvalue() == "placer: no baseline fits\n"


def test_library_code_outside_the_cli_never_calls_print():
    calls = []
    for path in sorted((ROOT / "placer").rglob("*.py")):
        if "cli" in path.relative_to(ROOT / "placer").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print":
                calls.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert calls == []


def test_optimize_says_what_it_profiles_before_it_starts_and_how_long_a_fresh_profile_took(tmp_path, caplog,
                                                                                            monkeypatch):
    """The 8-layer paper NMT's profile ran minutes with nothing on the terminal (2026-12-06)."""
    import placer
    from placer.optimizing import stages

    monkeypatch.setattr(stages, "SLOW_PROFILE_S", 0.0)  # every fresh profile counts as slow here

    def run() -> list[str]:
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="placer"):
            placer.optimize("zoo:rnnlm", cluster="4xK40", budget="50", out_dir=tmp_path / "out", progress=False,
                            baselines=("single",), verbose=1, check=False, cache_dir=tmp_path / "cache")
        return [r.getMessage() for r in caplog.records if r.name.startswith("placer")]

    first = run()
    starts = [i for i, m in enumerate(first) if "capturing the model and timing each op" in m]
    model_line = next(i for i, m in enumerate(first) if " ops in " in m and " groups" in m)
    assert starts and starts[0] < model_line
    assert any(m.startswith("profiled cpu in ") and "profile cache" in m for m in first)
    # Read back from the cache: nothing was profiled, so no such line.
    assert not any(m.startswith("profiled ") for m in run())
