"""Faults of multi-process runs, with two real CPU ranks: nothing listens beyond loopback, no
worker outlives a killed launcher, job files holding the weights do not survive the run,
and a hang is blamed on the rank that hung, not on the peer that waited for it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from envs.runtime.distributed.launcher import WorkerGroup, write_job
from envs.runtime.distributed.measure import DistributedMeasurer
from envs.runtime.distributed.rank_status import BARRIER, COMPUTING, WAITING, Status, culprit
from envs.runtime.supervisor import JOB_DIR_PREFIX, sweep_stale_job_dirs
from graphs.pipeline import prepare
from tests.helpers.processes import process_gone, wait_gone

ROOT = Path(__file__).resolve().parents[1]
DEVICES = "cpu:0,cpu:1"


def _socket_inodes(pid: int) -> set[str]:
    found = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            target = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if target.startswith("socket:["):
            found.add(target[8:-1])
    return found


def _address(hex_addr: str) -> str:
    """The IP of a /proc/net/tcp{,6} ``ADDR:PORT`` column, in the usual notation."""
    import ipaddress

    raw = bytes.fromhex(hex_addr.split(":")[0])
    if len(raw) == 4:
        return str(ipaddress.IPv4Address(raw[::-1]))
    # IPv6: four 32-bit words, each in host (little-endian) order
    return str(ipaddress.IPv6Address(b"".join(raw[i:i + 4][::-1] for i in range(0, 16, 4))))


def listening_addresses(pids) -> list[str]:
    """Every address a TCP socket of ``pids`` listens on (``/proc/net/tcp`` and ``tcp6``)."""
    inodes = set().union(*(_socket_inodes(p) for p in pids))
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as fh:
            for line in fh.readlines()[1:]:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                    found.append(_address(cols[1]))
    return found


def _is_loopback(addr: str) -> bool:
    import ipaddress

    ip = ipaddress.ip_address(addr)
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or (mapped is not None and mapped.is_loopback)


def _long_job(tmp_path):
    prep = prepare("zoo:rnnlm", {"size": "small"}, profile=False)
    groups = list(prep.grouping.graph.nodes)
    half = prep.grouping.expand({g: int(i >= len(groups) // 2) for i, g in enumerate(groups)})
    tasks = [{"kind": "measure", "ranks": half, "warmup": 0, "repeats": 1},
             {"kind": "measure", "ranks": half, "warmup": 0, "repeats": 100000}]
    write_job(tmp_path, prep.spec, "zoo:rnnlm", {"size": "small"}, DEVICES, tasks)


@pytest.mark.skipif(not os.path.exists("/proc/net/tcp"), reason="reads /proc/net/tcp")
def test_every_listening_socket_of_a_two_rank_job_is_on_loopback(tmp_path):
    """The rendezvous store of rank 0 and every gloo device listen on 127.0.0.1 only."""
    _long_job(tmp_path)
    with WorkerGroup(tmp_path, DEVICES) as group:
        group.start()
        first, why = group.wait_task(0, 240)
        assert first is not None, why
        addresses = listening_addresses([*group.pids, os.getpid()])
        assert len(addresses) >= 2, "expected at least the store and the gloo devices to listen"
        assert all(_is_loopback(a) for a in addresses), f"listening beyond loopback: {addresses}"


def test_rank_workers_die_with_a_killed_launcher_and_the_next_run_removes_its_job_files(tmp_path):
    """SIGKILL of placer: its ranks die with it, and the job directory (the model's weights)
    it could not remove is removed by the next run that makes one."""
    launcher = subprocess.Popen([sys.executable, "-c", textwrap.dedent('''
        import sys, time
        from envs.runtime.distributed.launcher import WorkerGroup, write_job
        from envs.runtime.supervisor import make_job_dir
        from graphs.pipeline import prepare
        prep = prepare("zoo:rnnlm", {"size": "small"}, profile=False)
        job = make_job_dir()
        groups = list(prep.grouping.graph.nodes)
        half = prep.grouping.expand({g: int(i >= len(groups) // 2) for i, g in enumerate(groups)})
        write_job(job, prep.spec, "zoo:rnnlm", {"size": "small"}, "cpu:0,cpu:1",
                  [{"kind": "measure", "ranks": half, "warmup": 0, "repeats": 1},
                   {"kind": "measure", "ranks": half, "warmup": 0, "repeats": 100000}])
        group = WorkerGroup(job, "cpu:0,cpu:1")
        group.start()
        res, why = group.wait_task(0, 240)
        print(job, *group.pids, flush=True)
        time.sleep(600)
    ''')], env=dict(os.environ, PYTHONPATH=str(ROOT)), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = launcher.stdout.readline().split()
        assert len(line) == 3, launcher.stderr.read()[-2000:]
        job, pids = Path(line[0]), [int(p) for p in line[1:]]
        assert job.name.startswith(JOB_DIR_PREFIX) and (job / "job.pt").exists()
        assert not any(process_gone(p) for p in pids)
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait(timeout=10)
        assert wait_gone(pids, timeout_s=20.0), "a rank outlived its killed launcher"
        assert job.exists()  # SIGKILL leaves no chance to clean up ...
        assert job in sweep_stale_job_dirs(job.parent)  # ... the next run does
        assert not job.exists()
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()


@pytest.mark.slow
def test_sigterm_of_placer_during_a_distributed_run_removes_its_job_files_and_workers(tmp_path):
    """SIGTERM while ranks run (here: measuring the links between them at start-up):
    placer exits 143, its job directory and its workers are gone."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp_path))
    proc = subprocess.Popen([sys.executable, "-m", "placer", "optimize", "zoo:rnnlm", "--size", "small",
                             "--devices", DEVICES, "--reward", "measured", "--budget", "5m",
                             "--out", str(tmp_path / "out"), "-q"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 240
        jobs: list[Path] = []
        while not jobs:
            assert proc.poll() is None, proc.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "no job directory appeared"
            jobs = [p for p in tmp_path.glob(f"{JOB_DIR_PREFIX}{proc.pid}-*") if (p / "job.pt").exists()]
            time.sleep(0.1)
        time.sleep(1.0)  # let the ranks start
        workers = [int(p) for p in os.listdir("/proc") if p.isdigit() and _cmdline(int(p)).count(str(jobs[0]))]
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 143, stderr[-2000:]
        assert not any(p.exists() for p in jobs), "the job files outlived SIGTERM"
        assert wait_gone(workers, timeout_s=20.0)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


def _hooked_model(hook: str, name: str) -> str:
    """A model file whose forward runs ``fc1``, the function ``name`` (source ``hook``, wrapped as a
    leaf for fx) and ``fc2``: the hook misbehaves on one rank in real steps."""
    return textwrap.dedent('''
    import os, time
    import torch
    import torch.fx
    import torch.nn as nn

    ''') + textwrap.dedent(hook) + textwrap.dedent(f'''
    torch.fx.wrap("{name}")

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(8, 8)
            self.fc2 = nn.Linear(8, 2)

        def forward(self, x):
            return self.fc2({name}(self.fc1(x)))

    def get_model():
        return Net()

    def get_example_inputs():
        return (torch.randn(4, 8),)
    ''')


STALLING_MODEL = _hooked_model('''
    def stall(x):
        # Hangs on the rank named by PLACER_TEST_STALL_RANK, in real steps only (not while
        # the model is captured on meta or fake tensors).
        if (os.environ.get("RANK") == os.environ.get("PLACER_TEST_STALL_RANK")
                and type(x) is torch.Tensor and x.device.type == "cpu" and x.shape[0] == 4):
            while True:
                time.sleep(0.05)
        return x

''', "stall")


def test_a_hung_rank_is_named_not_the_peer_that_waited_for_it(tmp_path, monkeypatch):
    model = tmp_path / "stalling_model.py"
    model.write_text(STALLING_MODEL)
    monkeypatch.setenv("PLACER_TEST_STALL_RANK", "1")
    with DistributedMeasurer(str(model), {}, DEVICES, warmup=0, repeats=1, timeout_s=3,
                             load_timeout_s=240) as m:
        names = [n.name for n in m.captured.gm.graph.nodes]
        assert "stall" in names, names
        fine = {n: "cpu:0" for n in names}  # rank 1 holds nothing: no stall
        hangs = {n: ("cpu:1" if n in ("stall", "fc2", "output") else "cpu:0") for n in names}
        start = time.monotonic()
        ok, hung = m.measure([fine, hangs])
        assert time.monotonic() - start < 240
    assert ok.valid, ok.reason
    assert not hung.valid
    assert hung.reason.startswith("worker rank 1 (cpu:1) hung"), hung.reason
    assert "timed out after 3s" in hung.reason and "rank 0" in hung.reason


def test_culprit_is_the_rank_computing_while_the_others_wait():
    waiting0 = Status(0, WAITING, 1, 2, 5, 4.0)
    computing1 = Status(1, COMPUTING, -1, 2, 5, 4.2)
    assert culprit([waiting0, computing1], [True, True]) == 1
    # Three ranks: rank 2 computes for long but nobody waits for it; rank 0 waits for 1.
    ranks = [Status(0, WAITING, 1, 0, 1, 1.0), Status(1, COMPUTING, -1, 0, 1, 1.0),
             Status(2, COMPUTING, -1, 0, 1, 9.0)]
    assert culprit(ranks, [True, True, True]) == 1
    # Everyone in a barrier: the records do not tell.
    assert culprit([Status(0, BARRIER, -1, 0, 0, 1.0), Status(1, BARRIER, -1, 0, 0, 1.0)], [True, True]) is None
    # A dead rank's stale record is ignored.
    assert culprit([waiting0, computing1], [True, False]) is None


def test_a_rank_started_on_a_folder_without_a_job_is_one_line_and_exit_status_2(tmp_path):
    """A mistyped or unshared job folder (docs/distributed.md, step 2) ended in a traceback
    about status-0.bin, a file the worker writes itself. In a process of its own: a rank
    changes its SIGINT handling and ties itself to its parent."""
    done = subprocess.run([sys.executable, "-m", "envs.runtime.distributed.worker", str(tmp_path / "no-job")],
                          cwd=ROOT, env={**os.environ, "RANK": "0", "WORLD_SIZE": "1"}, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 2
    assert "holds no job.pt" in done.stderr and "no-job" in done.stderr and "Traceback" not in done.stderr


SLOW_STEP_MODEL = _hooked_model('''
    def slow(x):
        # On rank 1, in real steps only (not while captured on meta, nor in the launcher, which
        # has no RANK): sleep, and log one line per step, so a test can count the steps run.
        if (os.environ.get("RANK") == "1" and type(x) is torch.Tensor and x.device.type == "cpu"
                and x.shape[0] == 4):
            time.sleep(float(os.environ["PLACER_TEST_STEP_S"]))
            with open(os.environ["PLACER_TEST_STEP_LOG"], "a") as fh:
                fh.write("step\\n")
        return x

''', "slow")


def _split_placement(model_file: Path, on_rank1: tuple[str, ...]):
    """The model file's spec, capture and a placement putting ``on_rank1`` on cpu:1, the rest on cpu:0."""
    from graphs.capture import capture
    from graphs.pipeline import load_source
    from placer.placement_file import Placement

    spec = load_source(str(model_file), {})
    captured = capture(spec.model, spec.example_inputs, name=spec.name)
    names = [n.name for n in captured.gm.graph.nodes]
    assert set(on_rank1) <= set(names), names
    assignment = {n: ("cpu:1" if n in on_rank1 else "cpu:0") for n in names}
    return spec, captured, Placement(assignment, captured.fingerprint, ["cpu:0", "cpu:1"])


# 8 s of steps past a time-out; naming the rank that made no progress stays in the default suite.
@pytest.mark.slow
def test_apply_over_workers_that_keep_stepping_runs_past_the_time_out_and_runs_each_step_once(tmp_path, monkeypatch):
    """``placer apply`` over worker processes was killed as "hung" once a task outlasted a fixed
    300 s although every step progressed, and it ran warmup + steps twice (a training task for
    the losses, then a measuring one for the times). Here the whole run (6 steps of 0.6 s)
    outlasts the 2 s time-out, which only a stall of 2 s may trip, and rank 1 runs 6 steps, not 12."""
    from placer.api import train_rank_steps

    model = tmp_path / "slow_model.py"
    model.write_text(SLOW_STEP_MODEL)
    log = tmp_path / "steps.log"
    monkeypatch.setenv("PLACER_TEST_STEP_S", "0.6")
    monkeypatch.setenv("PLACER_TEST_STEP_LOG", str(log))
    spec, captured, placement = _split_placement(model, ("slow", "fc2", "output"))
    stats = train_rank_steps(spec, captured, placement, str(model), steps=5, warmup=1, stall_timeout_s=2.0,
                             load_timeout_s=240.0)
    assert len(stats["losses"]) == 5 and len(stats["times"]) == 5
    assert all(t >= 0.6 for t in stats["times"]), stats["times"]
    assert log.read_text().count("step") == 6, "expected warmup + steps = 6 steps, each run once"


@pytest.mark.slow  # the measurer's hung-rank naming stays in the default suite
def test_apply_over_workers_names_the_rank_that_made_no_progress_and_where(tmp_path, monkeypatch):
    """A real hang still ends the run, after the no-progress time-out, naming the stalled rank and its step."""
    from graphs.errors import PlacerError
    from placer.api import train_rank_steps

    model = tmp_path / "stalling_model.py"
    model.write_text(STALLING_MODEL)
    monkeypatch.setenv("PLACER_TEST_STALL_RANK", "1")
    spec, captured, placement = _split_placement(model, ("stall", "fc2", "output"))
    start = time.monotonic()
    with pytest.raises(PlacerError) as exc:
        train_rank_steps(spec, captured, placement, str(model), steps=3, warmup=1, stall_timeout_s=3.0,
                         load_timeout_s=240.0)
    assert time.monotonic() - start < 240
    message = str(exc.value)
    assert "(1 warm-up + 3 steps)" in message, message
    assert "worker rank 1 (cpu:1) hung: no rank made progress for 3s" in message, message
    assert "computing (task 0, step 0)" in message and "rank 0 waiting for rank 1" in message, message
