"""Real step-time measurement in one process: the ground-truth reward of a placement.

The published protocol: apply the placement, run a few warm-up training steps, then
report the median of several synchronised steps (forward, loss, backward, optimizer
step; every CUDA device synchronised before the clock is read;
:func:`envs.runtime.step_timer.time_steps`). Each candidate runs in an isolated worker
process (:mod:`envs.runtime.measure_worker`, started by :class:`envs.runtime.supervisor.Supervisor`,
so it dies with its parent) with a time-out, so a placement that runs out of memory,
crashes the process or hangs comes back as an invalid :class:`MeasureResult` with its
reason and never takes the caller down.

A :class:`SingleProcessMeasurer` implements the :class:`envs.runtime.measurer.Measurer`
protocol: it keeps one worker alive and measures many candidates without re-loading the
model; a crashed or timed-out worker is replaced on the next call. Results are cached
(:class:`envs.runtime.measurer.MeasureCache`: assignment + model fingerprint + devices + protocol).

Example::

    with SingleProcessMeasurer("graphs/zoo/rnnlm.py", model_args={"size": "small"}) as m:
        [r] = m.measure([{node: "cpu" for node in m.node_names}])
        print(r.step_time, r.valid, r.reason)
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from envs.runtime.apply import realize_placement
from envs.runtime.measurer import MeasureCache, MeasureError, MeasureResult, check_timing
from envs.runtime.step_timer import MAX_REPEATS, MIN_TIMED_S, median_step_time
from envs.runtime.supervisor import Supervisor, exit_reason

__all__ = ["SingleProcessMeasurer", "measure_step_time", "budget_timeout", "check_timeouts", "BUDGET_SPENT"]

#: How often the parent checks that the worker is still alive while waiting (seconds).
_POLL_S = 0.05
#: The reason of a placement not run because the caller's deadline (the run's budget) passed.
BUDGET_SPENT = "not measured: the run's time budget is spent"
#: Reason of a measurement the run's time budget ended while it ran: the workers were stopped,
#: so it says nothing about the placement (not a hang, not an invalid placement).
BUDGET_CUT = "not measured: the run's time budget ended while it ran"


def budget_timeout(timeout_s: float, deadline: float | None) -> float:
    """The time-out of one run: ``timeout_s``, cut to what is left before ``deadline``
    (a ``time.monotonic()`` value; None: no deadline). 0 when the deadline has passed."""
    if deadline is None:
        return timeout_s
    return max(0.0, min(timeout_s, deadline - time.monotonic()))


def check_timeouts(timeout_s: float, load_timeout_s: float) -> None:
    """Refuse time-outs a measurer cannot run with (both must be positive seconds).

    Raises:
        MeasureError: either is zero or negative.
    """
    if timeout_s <= 0 or load_timeout_s <= 0:
        raise MeasureError(f"time-outs must be positive, got timeout_s={timeout_s}, load_timeout_s={load_timeout_s}")


def _source_string(model_source: Any) -> tuple[str, dict[str, Any]]:
    """Normalise a model source to a picklable string (+ model args of a ModelSpec)."""
    if isinstance(model_source, (str, os.PathLike)):
        text = os.fspath(model_source)
        if not text.startswith("zoo:"):
            path = Path(text)
            if not path.is_file():
                raise MeasureError(f"model file {text!r} does not exist; expected a path to a .py model file or 'zoo:<name>'")
            text = str(path.resolve())
        return text, {}
    path = getattr(model_source, "path", None)
    if path:  # a ModelSpec loaded from a file: re-load it in the worker from the same file
        return str(path), dict(getattr(model_source, "model_args", {}) or {})
    raise MeasureError(
        f"measurement loads the model in a separate process, so it needs a model file path or "
        f"'zoo:<name>', got {type(model_source).__name__}"
    )


def _crash_reason(exitcode: int | None) -> str:
    return "worker " + exit_reason(exitcode)


class SingleProcessMeasurer:
    """Measures placements of one model in one long-lived, isolated worker process.

    Args:
        model_source: model file path, ``"zoo:<name>"``, or a ModelSpec with a ``path``.
        model_args: keyword arguments for the model file (e.g. ``{"size": "small"}``).
        devices: how placement device names become torch devices: a Cluster, Device
            list or ``{name: real device}`` mapping; None when placements already use
            torch device strings.
        warmup, repeats: steps run before timing, and steps timed (the median is reported;
            ``repeats`` at least).
        min_timed_s, max_repeats: the timed steps fill at least ``min_timed_s`` seconds,
            judged from the warm-up steps, up to ``max_repeats``
            (:func:`envs.runtime.step_timer.repeats_for`); 0 times exactly ``repeats``.
        timeout_s: limit for one candidate (all its steps); the worker is killed past it.
        load_timeout_s: limit for starting the worker and loading + capturing the model.
        num_threads: torch intra-op threads in the worker (None: torch's default).
        cache: keep results (see :class:`~envs.runtime.measurer.MeasureCache`).
        expand: maps the placements given to :meth:`measure` to op placements, e.g.
            ``grouping.expand`` when callers place groups (``g0..gK``) rather than ops.
        output_device: where outputs are gathered and the loss computed (None: the
            apply default).
        leaf_modules: module paths or class names the worker keeps whole when it captures
            the model (those the placements were made with: ``CapturedModel.leaf_paths``).

    Attributes:
        deadline: a ``time.monotonic()`` instant no run may pass (the caller's budget);
            a run is cut at it, and placements not started by then come back invalid with
            :data:`BUDGET_SPENT` (not cached). None: only ``timeout_s`` applies.
    """

    def __init__(
        self,
        model_source: Any,
        model_args: Mapping[str, Any] | None = None,
        devices: Any = None,
        warmup: int = 3,
        repeats: int = 7,
        timeout_s: float = 300.0,
        load_timeout_s: float = 600.0,
        min_timed_s: float = MIN_TIMED_S,
        max_repeats: int = MAX_REPEATS,
        num_threads: int | None = None,
        cache: bool = True,
        expand: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
        output_device: str | None = None,
        leaf_modules: Sequence[str] = (),
    ) -> None:
        check_timing(warmup, repeats, min_timed_s, max_repeats)
        check_timeouts(timeout_s, load_timeout_s)
        self.model_source, extra_args = _source_string(model_source)
        self.model_args = {**extra_args, **dict(model_args or {})}
        self.devices = devices
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.min_timed_s, self.max_repeats = float(min_timed_s), int(max_repeats)
        self.timeout_s, self.load_timeout_s = float(timeout_s), float(load_timeout_s)
        self.num_threads = num_threads
        self.use_cache = cache
        self.expand = expand
        self.output_device = output_device
        self.leaf_modules = tuple(str(m) for m in leaf_modules)
        self.deadline: float | None = None
        self._cache = MeasureCache(protocol={"warmup": self.warmup, "repeats": self.repeats,
                                             "min_timed_s": self.min_timed_s, "max_repeats": self.max_repeats,
                                             "threads": num_threads, "runtime": "single-process"})
        self._sup: Supervisor | None = None
        self._proc: subprocess.Popen | None = None
        self._conn: Any = None
        self._fingerprint: str | None = None
        self._node_names: list[str] = []
        self._capture_method: str | None = None
        self.worker_starts = 0

    # ------------------------------------------------------------------ worker lifecycle

    def __enter__(self) -> SingleProcessMeasurer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten measurer must not leave a process behind
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the captured model (starts the worker if needed)."""
        if self._fingerprint is None:
            self.start()
        assert self._fingerprint is not None
        return self._fingerprint

    @property
    def node_names(self) -> list[str]:
        """The captured graph's node names, i.e. the keys a placement uses (starts the worker if needed)."""
        if self._fingerprint is None:
            self.start()
        return list(self._node_names)

    @property
    def capture_method(self) -> str:
        """``"fx"`` or ``"export"`` (starts the worker if needed)."""
        if self._fingerprint is None:
            self.start()
        return str(self._capture_method)

    @property
    def pid(self) -> int | None:
        """The worker's process id while it runs."""
        return self._proc.pid if self.alive and self._proc is not None else None

    @property
    def alive(self) -> bool:
        """True while a worker process is running."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        proc, conn, sup = self._proc, self._conn, self._sup
        self._proc = self._conn = self._sup = None
        if proc is not None and proc.poll() is None and conn is not None:
            try:
                conn.send(("stop",))
                proc.wait(timeout=5)
            except (OSError, EOFError, subprocess.TimeoutExpired):
                pass
        if sup is not None:
            sup.stop()
        if conn is not None:
            try:
                conn.close()
            except OSError:
                pass

    def _kill(self) -> None:
        if self._sup is not None:
            self._sup.stop()
        self.close()

    def start(self) -> None:
        """Start the worker and load the model (done lazily by :meth:`measure`).

        Raises:
            MeasureError: the model file fails to load or capture, or the worker dies or
                hangs while loading it.
        """
        if self.alive:
            return
        self.close()
        from envs.runtime.measure_worker import _DuplexConnection

        # Two pipes: parent -> child (requests) and child -> parent (replies). A fresh
        # interpreter via -m never re-imports the caller's main script (spawn would).
        req_r, req_w = os.pipe()
        rep_r, rep_w = os.pipe()
        sup = Supervisor()
        try:
            proc = sup.start("measure worker",
                             [sys.executable, "-m", "envs.runtime.measure_worker", str(req_r), str(rep_w)],
                             pass_fds=(req_r, rep_w))
        except BaseException:
            sup.stop()
            os.close(req_w)
            os.close(rep_r)
            raise
        finally:
            os.close(req_r)  # the child's ends: closing ours makes a dead child show as EOF
            os.close(rep_w)
        self._sup, self._proc, self._conn = sup, proc, _DuplexConnection(rep_r, req_w)
        self.worker_starts += 1
        try:
            self._conn.send(("load", self.model_source, self.model_args, self.num_threads, self.leaf_modules))
        except (OSError, EOFError):
            pass  # a worker that died at once is reported by _wait
        msg, why = self._wait(self.load_timeout_s)
        if msg is None:
            self._kill()
            raise MeasureError(f"could not load {self.model_source} for measurement: {why}")
        if msg[0] == "load_error":
            self.close()
            raise MeasureError(f"could not load {self.model_source} for measurement: {msg[1]}")
        _, fingerprint, node_names, method = msg
        # A model file changed under us: cached results describe another model.
        self._cache.set_fingerprint(fingerprint)
        self._fingerprint, self._node_names, self._capture_method = fingerprint, list(node_names), method

    def _wait(self, timeout_s: float) -> tuple[Any, str]:
        """Next message from the worker, or (None, reason) on crash or time-out."""
        assert self._proc is not None and self._conn is not None
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if self._conn.poll(_POLL_S):
                    return self._conn.recv(), ""
            except (EOFError, OSError):
                try:
                    self._proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    pass  # the pipe closed but the process lingers: _kill ends it
                return None, _crash_reason(self._proc.returncode)
            if self._proc.poll() is not None:
                # It may have answered just before dying.
                try:
                    if self._conn.poll(0):
                        return self._conn.recv(), ""
                except (EOFError, OSError):
                    pass
                return None, _crash_reason(self._proc.returncode)
            if time.monotonic() >= deadline:
                return None, f"timed out after {timeout_s:g}s"

    # ------------------------------------------------------------------ measuring

    def clear_cache(self) -> None:
        """Forget every result, so the next call measures again."""
        self._cache.clear()

    def measure(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """Measure placements (node → device name) one after the other; never raises for
        OOM, crash or time-out (see :class:`envs.runtime.measurer.Measurer`).

        Raises:
            MeasureError: the model cannot be loaded, or a placement names nodes the
                model does not have.
            envs.runtime.apply.ApplyError: a device the ``devices`` mapping does not know.
        """
        items = []
        for p in placements:
            ops = self.expand(p) if self.expand is not None else p
            items.append({str(k): str(v) for k, v in ops.items()})
        if not items:
            return []
        realized = [realize_placement(p, self.devices) if self.devices is not None else None for p in items]
        self.start()
        for p in items:
            unknown = sorted(set(p) - set(self._node_names))
            if unknown:
                raise MeasureError(
                    f"placement names {len(unknown)} node(s) the captured model does not have, e.g. {unknown[:3]}"
                )
        reals = [dict(r.virtual_to_real) if r is not None else None for r in realized]
        keys = [self._cache.key(p, real=real, out=self.output_device) for p, real in zip(items, reals)]

        def run(todo: list[int]) -> list[MeasureResult]:
            return [self._run_one(items[i], reals[i], realized[i]) for i in todo]

        if not self.use_cache:
            return [r for i in range(len(items)) for r in run([i])]
        return self._cache.measure(keys, run)

    def _run_one(self, placement: dict[str, str], real_devices: dict[str, str] | None, realized: Any) -> MeasureResult:
        common: dict[str, Any] = dict(note=realized.note if realized is not None else "",
                                      parallel=realized.parallel if realized is not None else True)
        timeout = budget_timeout(self.timeout_s, self.deadline)
        if timeout <= 0:
            return MeasureResult(step_time=float("inf"), valid=False, reason=BUDGET_SPENT, budget_cut=True, **common)
        self.start()
        assert self._conn is not None
        try:
            self._conn.send(("measure", placement, real_devices, self.output_device, self.warmup, self.repeats,
                             self.min_timed_s, self.max_repeats))
            msg, why = self._wait(timeout)
        except BaseException:
            # Interrupted (Ctrl-C) mid-run: the worker's late reply would be read as the
            # next placement's result, so this worker goes; the next call starts a fresh one.
            self._kill()
            raise
        if msg is None:
            self._kill()  # a hung or dead worker is replaced on the next call
            cut = timeout < self.timeout_s and why.startswith("timed out")
            if cut:
                why = BUDGET_CUT
            return MeasureResult(step_time=float("inf"), valid=False, reason=why, budget_cut=cut, **common)
        if msg[0] == "ok":
            times = tuple(float(t) for t in msg[1])
            return MeasureResult(step_time=median_step_time(times), times=times, peak_memory=dict(msg[2]), **common)
        return MeasureResult(step_time=float("inf"), valid=False, reason=str(msg[1]), **common)


def measure_step_time(
    model_source: Any,
    placement: Mapping[str, str],
    devices: Any = None,
    warmup: int = 3,
    repeats: int = 7,
    timeout_s: float = 300.0,
    model_args: Mapping[str, Any] | None = None,
    output_device: str | None = None,
    num_threads: int | None = None,
) -> MeasureResult:
    """Measure one placement in a fresh isolated worker (see :class:`SingleProcessMeasurer` for many).

    Args:
        model_source: model file path, ``"zoo:<name>"`` or a ModelSpec with a ``path``.
        placement: node name → device name.
        devices: Cluster / Device list / ``{name: real device}`` for virtual device
            names; None when ``placement`` uses torch device strings.
        warmup, repeats, timeout_s, num_threads: see :class:`SingleProcessMeasurer`.
        model_args: keyword arguments for the model file.
        output_device: where outputs are gathered (and the loss computed).

    Returns:
        A :class:`MeasureResult`; invalid (with ``reason``) on out of memory, crash,
        failure or time-out.
    """
    with SingleProcessMeasurer(
        model_source, model_args=model_args, devices=devices, warmup=warmup, repeats=repeats,
        timeout_s=timeout_s, num_threads=num_threads, cache=False, output_device=output_device,
    ) as m:
        return m.measure([placement])[0]
