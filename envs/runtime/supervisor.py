"""Start, watch and stop worker processes: the one supervisor of measurement and multi-process runs.

Both the single-process measure worker (:mod:`envs.runtime.measure`) and the ranks of a
multi-process job (:mod:`envs.runtime.distributed.launcher`) are started by a
:class:`Supervisor`. What it guarantees:

* **No orphans.** Every worker runs :func:`die_with_parent` first thing: on Linux the
  kernel sends it SIGKILL when the process that started it dies (``prctl(PR_SET_PDEATHSIG)``),
  and a watchdog thread exits it when the *lifeline* pipe closes (the supervisor holds its
  only write end, so the pipe closes when the supervisor's process dies for any reason,
  SIGKILL included, on every POSIX system). A worker never outlives ``placer``. (Linux
  ties the death signal to the *thread* that started the worker: start workers from a
  thread that lives as long as they should, as ``placer`` does from its main thread.)
* **One kill stops all.** The workers of one supervisor share one process group, outside
  the terminal's foreground group (a Ctrl-C reaches ``placer``, which then stops them);
  :meth:`Supervisor.stop` kills the group and reaps every process.
* **No leaked files.** Job directories (which can hold a whole model's weights) are named
  after the owner process (``placer-job-<pid>-<start time>-*``) by :func:`make_job_dir`;
  the owner removes its own on exit, SIGTERM included (``placer`` turns SIGTERM into an
  exception, so ``finally`` blocks run), and :func:`sweep_stale_job_dirs` — run by every
  :func:`make_job_dir` — removes those whose owner is gone (a SIGKILLed run).

Why not ``torch.distributed.elastic``'s agent: its subprocess handler starts each worker
in a new session with nothing tying it to the agent (the very orphan problem above),
cannot hand a worker a pipe, and brings its own rendezvous store; what is needed here is
forty lines of ``subprocess``. A later ``torch.distributed.pipelining`` runtime starts its
ranks through :class:`Supervisor` the same way.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from graphs.errors import PlacerError, kind_and_first_line

__all__ = [
    "Supervisor", "Exit", "die_with_parent", "exit_reason", "make_job_dir", "process_state", "sweep_stale_job_dirs",
    "JOB_DIR_PREFIX",
]

log = logging.getLogger(__name__)

#: The environment variables a worker reads in :func:`die_with_parent`.
PARENT_PID_ENV = "PLACER_PARENT_PID"
LIFELINE_FD_ENV = "PLACER_LIFELINE_FD"
#: Job directories are ``<tmp>/placer-job-<owner pid>-<owner start time>-<random>``.
JOB_DIR_PREFIX = "placer-job-"
_PR_SET_PDEATHSIG = 1


def exit_reason(code: int | None) -> str:
    """How a process ended, in words: ``crashed (signal 9, SIGKILL)``, ``crashed (exit code 1)``."""
    if code is None:
        return "crashed"
    if code < 0:
        try:
            return f"crashed (signal {-code}, {signal.Signals(-code).name})"
        except ValueError:
            return f"crashed (signal {-code})"
    return f"crashed (exit code {code})"


def die_with_parent() -> None:
    """Make this worker die with the process that started it (call first thing in the worker).

    Does nothing when the worker was not started by a :class:`Supervisor` (e.g. by
    ``torchrun`` on another host, which has its own agent watching it).
    """
    expected = os.environ.get(PARENT_PID_ENV)
    if expected is None:
        return
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass  # the lifeline below still covers it
    # The parent may have died before prctl took effect: then we were re-parented already.
    if os.getppid() != int(expected):
        os._exit(1)
    fd = os.environ.get(LIFELINE_FD_ENV)
    if fd is not None:
        threading.Thread(target=_watch_lifeline, args=(int(fd),), name="placer-lifeline", daemon=True).start()


def _watch_lifeline(fd: int) -> None:
    # Blocks until the supervisor's write end closes: its process is gone.
    try:
        while os.read(fd, 1):
            pass
    except OSError:
        pass
    os._exit(1)


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of ``/proc/<pid>/stat`` after the command name (state first), None where unreadable."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def process_state(pid: int) -> str:
    """The one-letter state of process ``pid`` (``T``: stopped by SIGSTOP or a debugger), "" where unknown."""
    fields = _stat_fields(pid)
    return fields[0] if fields else ""


def _start_time(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (clock ticks since boot), None when it does not exist."""
    fields = _stat_fields(pid)
    if fields is not None and len(fields) > 19:
        return fields[19]
    if sys.platform.startswith("linux"):
        return None
    try:  # no /proc: only whether the pid exists
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return "0"


def _owner_alive(pid: int, start: str) -> bool:
    now = _start_time(pid)
    return now is not None and (now == start or start == "0" or now == "0")



def report_rank_failure(job_dir: Path, rank: int, exc: BaseException, show_traceback: bool = True) -> None:
    """Leave a rank's failure where the launcher reads it: ``error-<rank>.txt`` in the job
    directory (the exception's first line, then the traceback), and the traceback on stderr. A
    first line that only introduces its cause (torch's pipelining stage: "[Stage 1] failed to run
    forward:", raised from the error) is followed by the cause's.

    Called from a worker's ``except BaseException``: the launcher names the rank and its
    error from this file, since the exit code alone says only that the rank failed.
    """
    line = kind_and_first_line(exc)
    cause = exc.__cause__
    while line.endswith(":") and cause is not None:  # a wrapper's words: "[Stage 1] failed to run forward:"
        line = f"{line} {kind_and_first_line(cause)}"
        cause = cause.__cause__
    try:
        (job_dir / f"error-{rank}.txt").write_text(line + "\n\n" + traceback.format_exc())
    except OSError:
        pass  # the job directory is gone (the launcher gave up): stderr still has it
    if show_traceback:
        traceback.print_exc()
    else:
        print(f"rank {rank}: {line}", file=sys.stderr)


def rank_dies_by_sigint() -> None:
    """Let SIGINT end this rank process by the signal, as SIGTERM does (Python's default for it).

    Under ``torchrun`` a Ctrl-C reaches every rank (one process group with the agent, which
    prints its own line and exits 130). As a KeyboardInterrupt it printed each rank's
    traceback, from wherever the rank was, and a rank blocked in a gloo call printed a second
    one when its peer was gone. (Under placer's own launchers the ranks have their own process
    group: Ctrl-C reaches placer only, which kills them.) The entry modules call this first
    thing, before their imports (torch: over a second), and :func:`worker_main` again.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def worker_main(module: str, run_rank: Callable[[Path, int, int], None], argv: Sequence[str] | None = None) -> int:
    """The entry point of a rank process, ``python -m <module> JOB_DIR``; returns its exit status.

    Dies with its parent, reads ``RANK``/``WORLD_SIZE`` (set by our launchers and by torchrun),
    runs ``run_rank(job_dir, rank, world)`` and leaves any failure where the launcher reads it
    (:func:`report_rank_failure`). Status 2: called wrongly, or a :class:`PlacerError` (bad input,
    a rendezvous port in use: one line on stderr); 1: the rank failed otherwise (traceback).
    Ctrl-C (SIGINT) ends it as SIGTERM does, by the signal, without a traceback (:func:`rank_dies_by_sigint`).
    """
    rank_dies_by_sigint()
    die_with_parent()
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print(f"usage: python -m {module} JOB_DIR (with RANK/WORLD_SIZE/MASTER_ADDR/MASTER_PORT set)",
              file=sys.stderr)
        return 2
    job_dir = Path(args[0])
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    except (KeyError, ValueError):
        print(f"{module} needs RANK and WORLD_SIZE in the environment (torchrun sets them)", file=sys.stderr)
        return 2
    if not (job_dir / "job.pt").is_file():
        # A mistyped or unshared job folder ended in a traceback about status-<rank>.bin, a
        # file the worker writes, not one the user was to give.
        print(f"{module}: {str(job_dir)!r} holds no job.pt; expected the job folder write_job wrote, at the same "
              "path on every host", file=sys.stderr)
        return 2
    try:
        run_rank(job_dir, rank, world)
    except PlacerError as exc:  # bad input or set-up (a port in use): one line, no traceback
        report_rank_failure(job_dir, rank, exc, show_traceback=False)
        return 2
    except BaseException as exc:  # noqa: BLE001 - every failure must reach the launcher
        report_rank_failure(job_dir, rank, exc)
        return 1
    return 0


def sweep_stale_job_dirs(root: str | os.PathLike | None = None) -> list[Path]:
    """Remove job directories whose owner process is gone; returns what was removed."""
    base = Path(root) if root is not None else Path(tempfile.gettempdir())
    removed = []
    for path in base.glob(JOB_DIR_PREFIX + "*"):
        parts = path.name[len(JOB_DIR_PREFIX):].split("-")
        if len(parts) < 3 or not parts[0].isdigit() or not path.is_dir():
            continue
        if _owner_alive(int(parts[0]), parts[1]):
            continue
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            log.info("removed %s, left by process %s that is gone", path, parts[0])
            removed.append(path)
    return removed


def make_job_dir(root: str | os.PathLike | None = None) -> Path:
    """A new job directory owned by this process (stale ones of dead owners are removed first)."""
    sweep_stale_job_dirs(root)
    me = os.getpid()
    return Path(tempfile.mkdtemp(prefix=f"{JOB_DIR_PREFIX}{me}-{_start_time(me) or '0'}-",
                                 dir=None if root is None else str(root)))


@dataclass(frozen=True)
class Exit:
    """A worker that ended: its label, exit status and how it ended in words."""

    label: str
    code: int
    reason: str


class Supervisor:
    """The worker processes of one job: started alike, watched, and stopped together.

    Example::

        with Supervisor() as sup:
            sup.start("rank 0", [sys.executable, "-m", "pkg.worker"], env={"RANK": "0"})
            while sup.running():
                ...
    """

    def __init__(self) -> None:
        self.procs: dict[str, subprocess.Popen] = {}
        self.pgid: int | None = None
        self._lifeline_r, self._lifeline_w = os.pipe()

    @property
    def pids(self) -> list[int]:
        """Process ids in start order."""
        return [p.pid for p in self.procs.values()]

    def start(self, label: str, argv: Sequence[str], env: Mapping[str, str] | None = None,
              pass_fds: Sequence[int] = (), stdout: IO[bytes] | int | None = None,
              stderr: IO[bytes] | int | None = None) -> subprocess.Popen:
        """Start one worker (``argv``) labelled ``label``; it must call :func:`die_with_parent`.

        ``env`` is added to this process's environment; ``PYTHONPATH`` gets the project root
        first, so ``python -m envs...`` finds this checkout.
        """
        if self._lifeline_w < 0:
            raise RuntimeError("this supervisor was stopped; make a new one")
        full = dict(os.environ)
        full.update(env or {})
        root = str(Path(__file__).resolve().parents[2])
        full["PYTHONPATH"] = root + (os.pathsep + full["PYTHONPATH"] if full.get("PYTHONPATH") else "")
        full[PARENT_PID_ENV] = str(os.getpid())
        full[LIFELINE_FD_ENV] = str(self._lifeline_r)
        proc = subprocess.Popen(
            list(argv), env=full, stdin=subprocess.DEVNULL, stdout=stdout, stderr=stderr,
            pass_fds=(self._lifeline_r, *pass_fds),
            # One group for all workers, not the terminal's: Ctrl-C reaches placer only, and
            # one killpg stops them all. (The first worker leads it; same session, so the
            # others can join.)
            process_group=0 if self.pgid is None else self.pgid,
        )
        if self.pgid is None:
            self.pgid = proc.pid
        self.procs[label] = proc
        return proc

    def running(self) -> bool:
        """True while any worker runs."""
        return any(p.poll() is None for p in self.procs.values())

    def exits(self) -> list[Exit]:
        """The workers that have ended, in start order."""
        out = []
        for label, p in self.procs.items():
            code = p.poll()
            if code is not None:
                out.append(Exit(label, code, "exited" if code == 0 else exit_reason(code)))
        return out

    def failures(self) -> list[Exit]:
        """The workers that ended with a non-zero status."""
        return [e for e in self.exits() if e.code != 0]

    def wait_all(self, timeout_s: float) -> bool:
        """Wait until every worker has exited; False when some still run after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while self.running():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Kill every worker (the whole process group) and reap them; idempotent."""
        if self.pgid is not None and any(p.poll() is None for p in self.procs.values()):
            try:
                os.killpg(self.pgid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        for p in self.procs.values():
            if p.poll() is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:  # pragma: no cover - SIGKILL is not ignorable
                log.warning("worker %d did not exit after SIGKILL", p.pid)
        for fd in (self._lifeline_r, self._lifeline_w):
            if fd >= 0:
                os.close(fd)
        self._lifeline_r = self._lifeline_w = -1

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def __del__(self) -> None:  # a forgotten supervisor must not leave a process behind
        try:
            self.stop()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
