"""The isolated process that measures training steps (the child side of :mod:`envs.runtime.measure`).

It loads the model once (model file or zoo name + model args: model objects need not
pickle), captures it, then answers measurement requests over a pipe, each one applying
a placement to a fresh copy of the captured model and timing full training steps.

It runs as ``python -m envs.runtime.measure_worker READ_FD WRITE_FD`` (a fresh interpreter: no
inherited CUDA state, and unlike ``multiprocessing`` spawn it never re-imports the
caller's main script). Messages are pickled tuples over two pipes, wrapped in
``multiprocessing.connection.Connection``; the worker's stdout/stderr stay the user's.

* parent → child first: ``("load", model_source, model_args, num_threads, leaf_modules)``.
* child → parent after loading: ``("ready", fingerprint, node_names, capture_method)``
  or ``("load_error", message)``.
* parent → child: ``("measure", assignment, real_devices, output_device, warmup, repeats,
  min_timed_s, max_repeats)``;
  child → parent: ``("ok", times, peak_memory)`` or ``("invalid", reason)``.
* parent → child: ``("stop",)``.

Crashes and hangs are the parent's business: it watches the process and the clock. The
worker dies with its parent (:func:`envs.runtime.supervisor.die_with_parent`), and times
its steps with the one step timer, :func:`envs.runtime.step_timer.time_steps`.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from envs.runtime.step_timer import time_steps
from envs.runtime.supervisor import die_with_parent
from graphs.cpu_allocator import retain_freed_memory
from graphs.errors import kind_and_first_line

if TYPE_CHECKING:  # types only: importing it here would load torch before it is needed
    from graphs.capture import CapturedModel

#: Substrings of allocator errors that mean "out of memory" on CPU and GPU.
_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def load_spec(model_source: str, model_args: Mapping[str, Any] | None, check_inputs: bool = True,
              build_device: str | None = None):
    """Load a ModelSpec from a model-file path or ``"zoo:<name>"`` (``check_inputs`` and
    ``build_device``: as :func:`graphs.model_file.load_model_file`)."""
    from graphs.model_file import load_model_file

    if model_source.startswith("zoo:"):
        from graphs.zoo import zoo_path

        model_source = str(zoo_path(model_source[4:]))
    return load_model_file(model_source, model_args=model_args, check_inputs=check_inputs, build_device=build_device)


def is_out_of_memory(exc: BaseException) -> bool:
    """True for CUDA/CPU allocation failures, whatever exception type carries them."""
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MARKERS)


def _synchronize(devices: set[torch.device]) -> None:
    # CUDA kernels run asynchronously: the clock may only be read once every device used is idle.
    for d in devices:
        if d.type == "cuda":
            torch.cuda.synchronize(d)


def time_training_steps(
    spec: Any,
    captured: CapturedModel,
    assignment: Mapping[str, str],
    real_devices: Mapping[str, str] | None,
    output_device: str | None,
    warmup: int,
    repeats: int,
    min_timed_s: float = 0.0,
    max_repeats: int | None = None,
) -> tuple[list[float], dict[str, int]]:
    """Apply ``assignment`` and time ``warmup`` then ``repeats`` full training steps, or as
    many as fill ``min_timed_s`` (:func:`envs.runtime.step_timer.time_steps`).

    Returns the timed steps' times (seconds) and peak CUDA memory per device.
    """
    from envs.runtime.apply import apply_placement
    from envs.runtime.transfers import to_device

    placed = apply_placement(captured, assignment, output_device=output_device, real_devices=real_devices)
    out_real = placed.placer_real_devices.get(placed.placer_output_device, placed.placer_output_device)
    devices = {torch.device(d) for d in placed.placer_real_devices.values()} | {torch.device(out_real)}
    for d in devices:
        if d.type == "cuda":
            torch.cuda.reset_peak_memory_stats(d)
    optimizer = spec.optimizer_fn(placed.parameters())
    # The loss reads the inputs (targets) next to the gathered output.
    loss_inputs = to_device(tuple(spec.example_inputs), out_real)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        out = placed(*spec.example_inputs)
        spec.loss_fn(out, *loss_inputs).backward()
        optimizer.step()

    # The placed model and its optimizer are freed when this returns (the worker then collects).
    times = list(time_steps(step, warmup, repeats, sync=lambda: _synchronize(devices), min_timed_s=min_timed_s,
                            max_repeats=max_repeats).times)
    peak = {str(d): int(torch.cuda.max_memory_allocated(d)) for d in devices if d.type == "cuda"}
    return times, peak


def capture_model(spec: Any, leaf_modules: Sequence[str] = ()) -> Any:
    """Capture ``spec.model`` so node names match the placement graph (made with ``leaf_modules``)."""
    from graphs.capture import capture

    return capture(spec.model, spec.example_inputs, leaf_modules=leaf_modules, name=spec.name, batch_dim=spec.batch_dim)


def worker_main(conn: Any) -> None:
    """Serve load and measure requests on ``conn`` until told to stop or the pipe closes."""
    try:
        _, model_source, model_args, num_threads, leaf_modules = conn.recv()
    except (EOFError, OSError):
        return
    if num_threads:
        torch.set_num_threads(num_threads)
    retain_freed_memory()  # as the profile that priced these placements ran (graphs.cpu_allocator)
    try:
        spec = load_spec(model_source, model_args)
        captured = capture_model(spec, leaf_modules)
    except Exception as exc:  # reported to the parent, which raises a clear error
        conn.send(("load_error", str(exc) or kind_and_first_line(exc)))
        conn.close()
        return
    conn.send(("ready", captured.fingerprint, [n.name for n in captured.gm.graph.nodes], captured.method))

    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return  # the parent went away
        if msg[0] == "stop":
            conn.close()
            return
        _, assignment, real_devices, output_device, warmup, repeats, min_timed_s, max_repeats = msg
        try:
            times, peak = time_training_steps(
                spec, captured, assignment, real_devices, output_device, warmup, repeats, min_timed_s, max_repeats
            )
            reply: tuple = ("ok", times, peak)
        except Exception as exc:
            if is_out_of_memory(exc):
                reply = ("invalid", f"out of memory ({kind_and_first_line(exc)[:200]})")
            else:
                reply = ("invalid", f"failed: {kind_and_first_line(exc)[:500]}")
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        conn.send(reply)


class _DuplexConnection:
    """One object with send/recv/poll over a read pipe and a write pipe."""

    def __init__(self, read_fd: int, write_fd: int) -> None:
        from multiprocessing.connection import Connection

        self._r = Connection(read_fd, writable=False)
        self._w = Connection(write_fd, readable=False)

    def send(self, obj: Any) -> None:
        self._w.send(obj)

    def recv(self) -> Any:
        return self._r.recv()

    def poll(self, timeout: float = 0.0) -> bool:
        return self._r.poll(timeout)

    def close(self) -> None:
        self._r.close()
        self._w.close()


def main(argv: list[str] | None = None) -> None:
    """``python -m envs.runtime.measure_worker READ_FD WRITE_FD``."""
    import sys

    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        raise SystemExit("usage: python -m envs.runtime.measure_worker READ_FD WRITE_FD (started by envs.runtime.measure)")
    worker_main(_DuplexConnection(int(args[0]), int(args[1])))


if __name__ == "__main__":
    main()
