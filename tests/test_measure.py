"""Real step-time measurement in an isolated worker: valid runs, cache, and every failure.

The faulty model's loss reads a flag file at every step, so one loaded worker can be
driven into each failure mode: out of memory (an impossible allocation, or a raised
torch.OutOfMemoryError), a Python error, SIGKILL, os._exit, and a hang past the time-out.
"""

from __future__ import annotations

import statistics
import textwrap

import pytest
import torch

from envs.runtime.measure import SingleProcessMeasurer, measure_step_time
from envs.runtime.measurer import MeasureError, Measurer, placement_hash
from graphs.errors import PlacerError

FAULTY_MODEL = textwrap.dedent(
    '''
    import os, signal, time
    import torch
    import torch.nn as nn

    _FLAG = None

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(16, 32)
            self.fc2 = nn.Linear(32, 4)

        def forward(self, x):
            return self.fc2(torch.relu(self.fc1(x)))

    def get_model(flag=""):
        global _FLAG
        _FLAG = flag
        return Net()

    def get_example_inputs(flag=""):
        return (torch.randn(8, 16),)

    def get_loss(output, *inputs):
        mode = open(_FLAG).read().strip() if _FLAG else "ok"
        if mode == "oom":
            torch.empty(1 << 50)  # 4 PiB of floats: the allocator refuses
        elif mode == "oom_raise":
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 PiB")
        elif mode == "error":
            raise ValueError("boom")
        elif mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif mode == "exit":
            os._exit(3)
        elif mode == "sleep":
            time.sleep(120)
        return output.pow(2).mean()
    '''
)



@pytest.fixture()
def faulty(tmp_path):
    model = tmp_path / "faulty_model.py"
    model.write_text(FAULTY_MODEL)
    flag = tmp_path / "flag"
    flag.write_text("ok")
    return model, flag


def _round_robin(names, devices=("gpu0", "gpu1")):
    return {n: devices[i % len(devices)] for i, n in enumerate(names)}


def test_a_short_step_is_timed_often_enough_to_fill_the_minimum_time(faulty):
    model, flag = faulty
    with SingleProcessMeasurer(model, model_args={"flag": str(flag)}, warmup=2, repeats=3, timeout_s=30,
                               num_threads=1, min_timed_s=0.2, max_repeats=40) as m:
        [r] = m.measure([dict.fromkeys(m.node_names, "cpu")])
    # A two-layer MLP steps in well under 5 ms: 0.2 s asks for more than 40, the cap.
    assert r.valid and len(r.times) == 40


def test_measurer_valid_runs_cache_and_every_failure(faulty):
    model, flag = faulty
    from envs.hardware.cluster import cluster_from_spec

    cluster = cluster_from_spec({  # two virtual devices mapped onto the one CPU
        "name": "2 virtual on cpu",
        "devices": [
            {"name": n, "kind": "cpu", "memory": "1GiB", "peak_flops": "1T", "mem_bandwidth": "10GB/s",
             "real_device": "cpu"} for n in ("gpu0", "gpu1")
        ],
        "links": [{"between": ["gpu0", "gpu1"], "latency": "10us", "bandwidth": "10GB/s"}],
    })
    with SingleProcessMeasurer(model, model_args={"flag": str(flag)}, devices=cluster, warmup=1, repeats=3,
                               timeout_s=4, num_threads=1, min_timed_s=0) as m:  # exactly 3 timed steps
        assert isinstance(m, Measurer)
        assert m.node_names == ["x", "fc1", "relu", "fc2", "output"]  # loads the model
        placement = _round_robin(m.node_names)
        [r] = m.measure([placement])
        assert r.valid, r.reason
        assert r.source == "measured" and len(r.times) == 3 and r.step_time == statistics.median(r.times)
        assert 0 < r.step_time < 4
        assert not r.parallel and "gpu0, gpu1 → cpu" in r.note and "no parallelism" in r.note
        assert m.capture_method in ("fx", "export") and m.fingerprint

        [again] = m.measure([dict(reversed(list(placement.items())))])
        assert again.cached and again.step_time == r.step_time

        [single] = m.measure([{n: "gpu0" for n in m.node_names}])
        assert single.valid and not single.cached and single.placement_hash != r.placement_hash
        # Group placements expand to op placements (what grouping.expand does).
        m.expand = lambda groups: {op: groups["g0" if op in ("x", "fc1") else "g1"] for op in m.node_names}
        [grouped] = m.measure([{"g0": "gpu0", "g1": "gpu0"}])
        assert grouped.cached and grouped.placement_hash == single.placement_hash
        m.expand = None
        assert m.worker_starts == 1  # several candidates, one load

        other = _round_robin(m.node_names, ("gpu1", "gpu0"))
        for mode, reason in [
            ("oom", "out of memory"),
            ("oom_raise", "out of memory"),
            ("error", "failed: ValueError: boom"),
        ]:
            flag.write_text(mode)
            m.output_device = "gpu0" if mode != "error" else "gpu1"
            [bad] = m.measure([other])
            assert not bad.valid and bad.reason.startswith(reason), bad.reason
            assert bad.step_time == float("inf")
        assert m.worker_starts == 1 and m.alive  # in-worker failures keep the worker
        m.output_device = None

        for i, (mode, reason) in enumerate([
            ("kill", "worker crashed (signal 9, SIGKILL)"),
            ("exit", "worker crashed (exit code 3)"),
            ("sleep", "timed out after 4s"),
        ]):
            flag.write_text(mode)
            [bad] = m.measure([{**other, "fc1": ["gpu0", "gpu1", "gpu0"][i], "relu": "gpu1" if i else "gpu0"}])
            assert not bad.valid and bad.reason == reason
            assert not m.alive  # dead or killed; replaced on the next call

        flag.write_text("ok")
        [back] = m.measure([{n: "gpu1" for n in m.node_names}])
        assert back.valid and m.worker_starts == 4
    assert not m.alive


def test_a_run_interrupted_by_ctrl_c_drops_its_worker(faulty):
    """Its late reply would otherwise be read as the next placement's result."""
    model, flag = faulty
    with SingleProcessMeasurer(model, model_args={"flag": str(flag)}, warmup=0, repeats=1, num_threads=1) as m:
        first = {n: "cpu" for n in m.node_names}
        real_wait = m._wait

        def interrupted(timeout_s):
            raise KeyboardInterrupt

        m._wait = interrupted
        with pytest.raises(KeyboardInterrupt):
            m.measure([first])
        assert not m.alive
        m._wait = real_wait
        [again] = m.measure([first])
        assert again.valid and not again.cached and m.worker_starts == 2


def test_bad_requests_raise_clear_errors(tmp_path, faulty):
    with pytest.raises(MeasureError, match="does not exist"):
        SingleProcessMeasurer(tmp_path / "missing.py")
    with pytest.raises(MeasureError, match="model file path"):
        SingleProcessMeasurer(torch.nn.Linear(2, 2))
    with pytest.raises(MeasureError, match="repeats >= 1"):
        SingleProcessMeasurer(faulty[0], repeats=0)
    with pytest.raises(MeasureError, match="time-outs must be positive"):
        SingleProcessMeasurer(faulty[0], load_timeout_s=0)
    bad = tmp_path / "bad_model.py"
    bad.write_text("x = 1\n")
    with pytest.raises(MeasureError, match="does not define a model"):
        measure_step_time(bad, {})
    assert issubclass(MeasureError, PlacerError)


def test_placement_hash_is_order_independent_and_model_specific():
    a = placement_hash({"x": "gpu0", "y": "gpu1"}, "fp1")
    assert a == placement_hash({"y": "gpu1", "x": "gpu0"}, "fp1")
    assert a != placement_hash({"y": "gpu1", "x": "gpu0"}, "fp2")
    assert a != placement_hash({"x": "gpu1", "y": "gpu1"}, "fp1")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_cuda_placement_is_measured(faulty):
    model, flag = faulty
    with SingleProcessMeasurer(model, model_args={"flag": str(flag)}, warmup=2, repeats=5, output_device="cpu") as m:
        [r] = m.measure([_round_robin(m.node_names, ("cpu", "cuda:0"))])
        assert r.valid, r.reason
        assert r.parallel and "cuda:0" in r.peak_memory
