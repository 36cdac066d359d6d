"""The search's progress bar: redrawn on every batch on a terminal, at most every 30 s into a file or pipe."""

from __future__ import annotations

import io

import numpy as np
import torch

from envs.hardware.loading import load_cluster
from envs.sim.problem_compile import compile_problem
from graphs.capture import capture
from placer.search.tracker import BestTracker


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _redraws(monkeypatch, tty: bool, batches: int = 2_000) -> int:
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2))
    cap = capture(model, (torch.randn(2, 4),))
    problem = compile_problem(cap.graph, load_cluster("4xK40"))
    stream = _Stream(tty)
    monkeypatch.setattr("sys.stderr", stream)
    tracker = BestTracker(problem, budget=10 * batches, progress=True)
    rows = np.zeros((1, problem.num_nodes), dtype=np.int64)
    for i in range(batches):
        tracker.record(rows, np.array([1.0 - i * 1e-4]), np.array([True]))
    tracker.result("budget")
    text = stream.getvalue()
    return text.count("\r") + text.count("\n")


def test_progress_into_a_log_file_writes_a_handful_of_lines_not_one_per_batch(monkeypatch):
    assert _redraws(monkeypatch, tty=False) <= 5


def test_progress_on_a_terminal_redraws_on_every_batch(monkeypatch):
    assert _redraws(monkeypatch, tty=True, batches=300) >= 300
