"""``python -m envs.runtime.torchrun``: torchrun whose rendezvous store listens only on
``--master-addr``, and a port in use refused in one line."""

from __future__ import annotations

import copy
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from envs.runtime.pipeline.launcher import read_results, write_job
from envs.sim.pipeline_layout import Pipeline
from tests.helpers.runtime_models import Chain, model_and_batch, stages_of

ROOT = Path(__file__).resolve().parents[1]
SGD = ("sgd", {"lr": 0.1, "momentum": 0.9})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening_on(port: int) -> set[str]:
    """Local addresses (hex, as /proc/net/tcp{,6} write them) of the sockets listening on ``port``."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                local, state = line.split()[1], line.split()[3]
                addr, hex_port = local.split(":")
                if state == "0A" and int(hex_port, 16) == port:
                    found.add(addr)
    return found


def _command(port: int, job: Path) -> list[str]:
    return [sys.executable, "-m", "envs.runtime.torchrun", "--nnodes=1", "--nproc-per-node=2",
            "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "envs.runtime.pipeline.worker", str(job)]


def test_the_store_listens_on_the_master_address_only_and_the_job_trains(tmp_path):
    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "1f1b")
    write_job(tmp_path, gm, batch, pipe, steps=3, optimizer=SGD)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(_command(port, tmp_path), env=env, cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    seen: set[str] = set()
    while proc.poll() is None:
        seen |= _listening_on(port)
        time.sleep(0.01)
    _, err = proc.communicate()
    assert proc.returncode == 0, err[-2000:]
    assert seen == {"0100007F"}, f"listening on {seen}; expected 127.0.0.1 only"
    model = copy.deepcopy(gm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    expected = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(batch["x"], batch["y"])
        loss.backward()
        opt.step()
        expected.append(float(loss.detach()))
    assert read_results(tmp_path, 2).losses == pytest.approx(expected, rel=1e-5)


def test_a_port_in_use_is_one_line_and_exit_status_2(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        done = subprocess.run(_command(port, tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                              capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0 and "Traceback" not in done.stderr
    assert f"127.0.0.1:{port}" in done.stderr and "in use" in done.stderr
    assert not list(tmp_path.iterdir())  # no worker started


def test_rendezvous_kinds_whose_stores_listen_everywhere_are_refused_in_one_line(tmp_path):
    for extra in (["--standalone"], ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{_free_port()}"]):
        cmd = [sys.executable, "-m", "envs.runtime.torchrun", "--nnodes=1", "--nproc-per-node=2", *extra,
               "-m", "envs.runtime.pipeline.worker", str(tmp_path)]
        done = subprocess.run(cmd, env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "listen on every interface; expected the static rendezvous" in done.stderr


@pytest.mark.parametrize("extra, expected", [
    (["--master-port=99999"], "torchrun: --master-port '99999' is not a port; expected an integer from 1 to 65535\n"),
    (["--nproc-per-node=0"], "torchrun: --nproc-per-node '0' is not a process count"),
    (["--nproc-per-node=abc"], "torchrun: --nproc-per-node 'abc' is not a process count"),
])
def test_a_port_or_process_count_torch_cannot_use_is_one_line_before_anything_starts(capsys, tmp_path, extra,
                                                                                       expected):
    """torch reported these with a 27-line traceback, a bare AssertionError and two chained ones."""
    from envs.runtime.torchrun import main

    argv = ["--nnodes=1", "--nproc-per-node=2", "--master-addr=127.0.0.1", f"--master-port={_free_port()}", *extra,
            "-m", "envs.runtime.pipeline.worker", str(tmp_path)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(expected) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())


def test_ctrl_c_stops_the_job_with_the_wrappers_line_and_no_traceback_from_its_workers(tmp_path):
    """Ctrl-C reaches the whole foreground process group: the wrapper said its one line and exited
    130, but each rank printed a KeyboardInterrupt traceback (and one blocked in gloo a second one
    when its peer was gone). The ranks now end by the signal, as they do on SIGTERM."""
    import signal

    gm, batch = model_and_batch(Chain)
    pipe = Pipeline(stages_of(gm, {"l3"}), ("cpu:0", "cpu:1"), 4, "1f1b")
    write_job(tmp_path, gm, batch, pipe, steps=100_000, optimizer=SGD)  # still training when interrupted
    proc = subprocess.Popen(_command(_free_port(), tmp_path), env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready-{r}").exists() for r in range(2)) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # into the pipeline's first steps
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    assert err.rstrip().endswith("torchrun: stopped by SIGINT; its workers were stopped")
