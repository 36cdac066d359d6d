"""The model line behind an update of its state that a trace did not record, named in the
refusal (:func:`graphs.state_snapshot.checked_trace`'s ``locate``).

:func:`last_user_line` reads it from a node's stack trace; :func:`line_updating` reruns the
trace under a profile hook and catches the first in-place call on an updated tensor.
"""

from __future__ import annotations

import sys
import traceback
from typing import Any

import torch

from graphs.user_frames import describe_frame, is_user_file


def last_user_line(stack_trace: str) -> str | None:
    frames = traceback.StackSummary.from_list([])
    lines = stack_trace.strip().splitlines()
    for i, text in enumerate(lines):
        text = text.strip()
        if text.startswith("File \"") and ", line " in text:
            filename = text[len("File \""):text.index("\", line ")]
            lineno = int(text.split(", line ")[1].split(",")[0])
            func = text.split(" in ")[-1] if " in " in text else ""
            frames.append(traceback.FrameSummary(filename, lineno, func, line=None))
    users = [f for f in frames if is_user_file(f.filename)]
    return describe_frame(users[-1]) if users else None


def line_updating(targets: list[torch.Tensor], retrace: Any) -> str | None:
    """Rerun ``retrace`` with a profiler hook; the model line of the first in-place call on a target."""
    ids = {id(t) for t in targets}
    found: list[str] = []

    def hook(frame: Any, event: str, arg: Any) -> None:
        if found or event != "c_call":
            return
        owner = getattr(arg, "__self__", None)
        if id(owner) in ids and str(getattr(arg, "__name__", "")).endswith("_"):
            for summary in reversed(traceback.extract_stack(frame)):
                if is_user_file(summary.filename):
                    found.append(describe_frame(summary))
                    return

    sys.setprofile(hook)
    try:
        retrace()
    finally:
        sys.setprofile(None)
    return found[0] if found else None
