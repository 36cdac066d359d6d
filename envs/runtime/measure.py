"""Real step-time measurement: the ground-truth reward of a placement.

The published protocol: apply the placement, run a few warm-up training steps, then
report the median of several synchronised steps (forward, loss, backward, optimizer
step; every CUDA device synchronised before the clock is read). Each candidate runs in
an isolated worker process (:mod:`envs.runtime.measure_worker`) with a time-out, so a
placement that runs out of memory, crashes the process or hangs comes back as an
invalid :class:`MeasureResult` with its reason and never takes the caller down.

A :class:`Measurer` keeps one worker alive and measures many candidates without
re-loading the model; a crashed or timed-out worker is replaced on the next call.
Results are cached by placement hash (assignment + model fingerprint + protocol).

Example::

    with Measurer("graphs/zoo/rnnlm.py", model_args={"size": "small"}) as m:
        r = m.measure({node: "cpu" for node in m.node_names})
        print(r.step_time, r.valid, r.reason)
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from envs.runtime.apply import realize_placement
from graphs.errors import PlacerError

__all__ = ["MeasureError", "MeasureResult", "Measurer", "measure_step_time", "placement_hash"]

#: How often the parent checks that the worker is still alive while waiting (seconds).
_POLL_S = 0.05


class MeasureError(PlacerError):
    """The model cannot be measured at all (its file does not load or capture), or a bad request."""


@dataclass(frozen=True)
class MeasureResult:
    """The measured step time of one placement.

    Attributes:
        step_time: median of ``times`` in seconds; ``inf`` when invalid.
        times: the timed (post-warm-up) steps, seconds.
        valid: False when the run went out of memory, crashed, failed or timed out.
        reason: why it is invalid ("" when valid).
        source: always ``"measured"`` (the simulator says ``"simulated"``).
        note: caveats, e.g. virtual devices sharing one real device (no parallelism).
        parallel: False when several placed devices are one real device.
        peak_memory: peak CUDA bytes allocated per real device (empty on CPU).
        placement_hash: the cache key.
        cached: True when this result came from the cache.
    """

    step_time: float
    times: tuple[float, ...] = ()
    valid: bool = True
    reason: str = ""
    source: str = "measured"
    note: str = ""
    parallel: bool = True
    peak_memory: Mapping[str, int] = field(default_factory=dict)
    placement_hash: str = ""
    cached: bool = False


def placement_hash(assignment: Mapping[str, str], fingerprint: str, extra: Mapping[str, Any] | None = None) -> str:
    """A stable SHA-256 of the sorted assignment, the model fingerprint and ``extra`` settings."""
    doc = {"fingerprint": fingerprint, "assignment": sorted(assignment.items()), "extra": extra or {}}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()


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
    if exitcode is None:
        return "worker crashed"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
            return f"worker crashed (signal {-exitcode}, {name})"
        except ValueError:
            return f"worker crashed (signal {-exitcode})"
    return f"worker crashed (exit code {exitcode})"


class Measurer:
    """Measures placements of one model in one long-lived, isolated worker process.

    Args:
        model_source: model file path, ``"zoo:<name>"``, or a ModelSpec with a ``path``.
        model_args: keyword arguments for the model file (e.g. ``{"size": "small"}``).
        devices: how placement device names become torch devices: a Cluster, Device
            list or ``{name: real device}`` mapping; None when placements already use
            torch device strings.
        warmup, repeats: steps run before timing, and steps timed (the median is reported).
        timeout_s: limit for one candidate (all its steps); the worker is killed past it.
        load_timeout_s: limit for starting the worker and loading + capturing the model.
        num_threads: torch intra-op threads in the worker (None: torch's default).
        cache: keep results by placement hash.
        expand: maps the placements given to :meth:`measure` to op placements, e.g.
            ``grouping.expand`` when callers place groups (``g0..gK``) rather than ops.
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
        num_threads: int | None = None,
        cache: bool = True,
        expand: Callable[[Mapping[str, str]], Mapping[str, str]] | None = None,
    ) -> None:
        if warmup < 0 or repeats < 1:
            raise MeasureError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
        if timeout_s <= 0 or load_timeout_s <= 0:
            raise MeasureError(f"time-outs must be positive, got timeout_s={timeout_s}, load_timeout_s={load_timeout_s}")
        self.model_source, extra_args = _source_string(model_source)
        self.model_args = {**extra_args, **dict(model_args or {})}
        self.devices = devices
        self.warmup, self.repeats = int(warmup), int(repeats)
        self.timeout_s, self.load_timeout_s = float(timeout_s), float(load_timeout_s)
        self.num_threads = num_threads
        self.use_cache = cache
        self.expand = expand
        self._cache: dict[str, MeasureResult] = {}
        self._proc: Any = None
        self._conn: Any = None
        self._fingerprint: str | None = None
        self._node_names: list[str] = []
        self._capture_method: str | None = None
        self.worker_starts = 0

    # ------------------------------------------------------------------ worker lifecycle

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __del__(self) -> None:  # a forgotten Measurer must not leave a process behind
        try:
            self.close()
        except Exception:
            pass

    @property
    def fingerprint(self) -> str:
        """Fingerprint of the captured model (starts the worker if needed)."""
        if self._fingerprint is None:
            self.start()
        return self._fingerprint  # type: ignore[return-value]

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
        return self._capture_method  # type: ignore[return-value]

    @property
    def alive(self) -> bool:
        """True while a worker process is running."""
        return self._proc is not None and self._proc.poll() is None

    def close(self) -> None:
        """Stop the worker (politely, then by force)."""
        proc, conn = self._proc, self._conn
        self._proc = self._conn = None
        if proc is None:
            return
        try:
            if proc.poll() is None:
                conn.send(("stop",))
                proc.wait(timeout=5)
        except (OSError, EOFError, subprocess.TimeoutExpired):
            pass
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=5)
        try:
            conn.close()
        except OSError:
            pass

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(timeout=5)
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
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        try:
            proc = subprocess.Popen(
                [sys.executable, "-m", "envs.runtime.measure_worker", str(req_r), str(rep_w)],
                pass_fds=(req_r, rep_w),
                env=env,
                stdin=subprocess.DEVNULL,
                start_new_session=True,  # a Ctrl-C in the terminal reaches the caller, who stops us
            )
        finally:
            os.close(req_r)  # the child's ends: closing ours makes a dead child show as EOF
            os.close(rep_w)
        self._proc, self._conn = proc, _DuplexConnection(rep_r, req_w)
        self.worker_starts += 1
        try:
            self._conn.send(("load", self.model_source, self.model_args, self.num_threads))
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
        if self._fingerprint is not None and fingerprint != self._fingerprint:
            # The model file changed under us: cached results describe another model.
            self._cache.clear()
        self._fingerprint, self._node_names, self._capture_method = fingerprint, list(node_names), method

    def _wait(self, timeout_s: float) -> tuple[Any, str]:
        """Next message from the worker, or (None, reason) on crash or time-out."""
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

    def measure(self, placement: Mapping[str, str], output_device: str | None = None) -> MeasureResult:
        """Measure one placement (node → device name); never raises for OOM, crash or time-out.

        Raises:
            MeasureError: the model cannot be loaded, or the placement names nodes the
                model does not have.
            envs.runtime.apply.ApplyError: a device the ``devices`` mapping does not know.
        """
        if self.expand is not None:
            placement = self.expand(placement)
        placement = {str(k): str(v) for k, v in placement.items()}
        realized = realize_placement(placement, self.devices) if self.devices is not None else None
        real_devices = dict(realized.virtual_to_real) if realized is not None else None
        note = realized.note if realized is not None else ""
        parallel = realized.parallel if realized is not None else True

        self.start()
        unknown = sorted(set(placement) - set(self._node_names))
        if unknown:
            raise MeasureError(
                f"placement names {len(unknown)} node(s) the captured model does not have, e.g. {unknown[:3]}"
            )
        key = placement_hash(
            placement,
            self._fingerprint or "",
            {"real": real_devices, "out": output_device, "warmup": self.warmup, "repeats": self.repeats},
        )
        if self.use_cache and key in self._cache:
            hit = self._cache[key]
            return MeasureResult(**{**hit.__dict__, "cached": True})

        try:
            self._conn.send(("measure", placement, real_devices, output_device, self.warmup, self.repeats))
            msg, why = self._wait(self.timeout_s)
        except BaseException:
            # Interrupted (Ctrl-C) mid-run: the worker's late reply would be read as the
            # next placement's result, so this worker goes; the next call starts a fresh one.
            self._kill()
            raise
        common = dict(note=note, parallel=parallel, placement_hash=key)
        if msg is None:
            self._kill()  # a hung or dead worker is replaced on the next call
            result = MeasureResult(step_time=float("inf"), valid=False, reason=why, **common)
        elif msg[0] == "ok":
            times = tuple(float(t) for t in msg[1])
            result = MeasureResult(
                step_time=float(statistics.median(times)), times=times, peak_memory=dict(msg[2]), **common
            )
        else:
            result = MeasureResult(step_time=float("inf"), valid=False, reason=str(msg[1]), **common)
        if self.use_cache:
            self._cache[key] = result
        return result

    def measure_many(self, placements: Sequence[Mapping[str, str]]) -> list[MeasureResult]:
        """Measure several placements one after the other in this worker (see :meth:`measure`)."""
        return [self.measure(p) for p in placements]


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
    """Measure one placement in a fresh isolated worker (see :class:`Measurer` for many).

    Args:
        model_source: model file path, ``"zoo:<name>"`` or a ModelSpec with a ``path``.
        placement: node name → device name.
        devices: Cluster / Device list / ``{name: real device}`` for virtual device
            names; None when ``placement`` uses torch device strings.
        warmup, repeats, timeout_s, num_threads: see :class:`Measurer`.
        model_args: keyword arguments for the model file.
        output_device: where outputs are gathered (and the loss computed).

    Returns:
        A :class:`MeasureResult`; invalid (with ``reason``) on out of memory, crash,
        failure or time-out.
    """
    with Measurer(
        model_source, model_args=model_args, devices=devices, warmup=warmup, repeats=repeats,
        timeout_s=timeout_s, num_threads=num_threads, cache=False,
    ) as m:
        return m.measure(placement, output_device=output_device)
