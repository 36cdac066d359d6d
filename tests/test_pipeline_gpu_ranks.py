"""Pipelines whose stage devices are GPUs: one process per GPU under NCCL, refused where they cannot run.

This machine has no GPU, so what runs here is everything decided before a GPU is touched:
which device each rank computes on, that CPU workers and GPUs are not mixed in one job, that
a GPU the machine lacks is refused before any process starts, that ``apply`` runs a pipeline
over this machine's GPUs as processes, and that NCCL's bootstrap stays on loopback for a local
job. The GPU run itself is part of the prepared GPU check (``benchmarks/gpu_check.py``).
"""

from __future__ import annotations

import pytest
import torch

import envs.runtime.pipeline.launcher as launcher
from envs.hardware.rank_devices import parse_rank_devices
from envs.runtime.listening import nccl_environment
from envs.runtime.pipeline.launcher import run_training
from envs.runtime.pipeline.worker import check_stage_devices, rank_device
from envs.sim.pipeline_layout import Pipeline, PipelineError
from placer.api import pipeline_run_mode
from placer.placement_file import Placement
from tests.helpers.runtime_models import Chain, model_and_batch, stages_of


@pytest.fixture
def no_process_starts(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a worker process was started")

    monkeypatch.setattr(launcher, "PipelineJob", refuse)


def test_each_rank_computes_on_its_stages_device_replica_by_replica():
    hybrid = Pipeline((("a",), ("b",)), ("cuda:1", "cuda:0"), 4, "1f1b", replicas=(("cuda:3", "cuda:2"),))
    assert [str(rank_device(hybrid, r)) for r in range(4)] == ["cuda:1", "cuda:0", "cuda:3", "cuda:2"]
    # Interleaved: rank r runs stages r, r + P, ...; its device is its first stage's.
    interleaved = Pipeline((("a",), ("b",), ("c",), ("d",)), ("cuda:1", "cuda:0", "cuda:1", "cuda:0"), 4,
                           "interleaved_1f1b")
    assert [str(rank_device(interleaved, r)) for r in range(2)] == ["cuda:1", "cuda:0"]
    cpu = Pipeline((("a",), ("b",)), ("cpu:0", "cpu:1"), 2, "gpipe")
    assert [rank_device(cpu, r) for r in range(2)] == [torch.device("cpu")] * 2


def test_cpu_workers_mixed_with_gpus_are_refused_naming_both():
    with pytest.raises(PipelineError, match=r"mixes CPU workers \(cpu:0\) with GPUs \(cuda:0\).*gloo sends CPU "
                                            r"tensors only and NCCL GPU ones"):
        check_stage_devices(parse_rank_devices(["cpu:0", "cuda:0"]), gpus=1)


def test_a_gpu_the_machine_lacks_is_refused_and_present_ones_pass():
    with pytest.raises(PipelineError, match=r"GPU\(s\) cuda:2 are not on this machine, which has 2 GPU\(s\); "
                                            r"expected cuda:0 to cuda:1"):
        check_stage_devices(parse_rank_devices(["cuda:1", "cuda:2"]), gpus=2)
    with pytest.raises(PipelineError, match=r"which has 0 GPU\(s\); torch.cuda.device_count\(\) is 0"):
        check_stage_devices(parse_rank_devices(["cuda:0", "cuda:1"]), gpus=0)
    check_stage_devices(parse_rank_devices(["cuda:0", "cuda:1"]), gpus=2)
    check_stage_devices(parse_rank_devices(["cpu:0", "cpu:1"]), gpus=0)


def test_run_training_refuses_a_mixed_or_absent_gpu_pipeline_before_any_process_starts(no_process_starts,
                                                                                        monkeypatch):
    gm, batch = model_and_batch(Chain)
    stages = stages_of(gm, {"l3"})
    with pytest.raises(PipelineError, match="mixes CPU workers"):
        run_training(gm, batch, Pipeline(stages, ("cpu:0", "cuda:0"), 2, "gpipe"))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(PipelineError, match=r"cuda:1 are not on this machine, which has 1 GPU"):
        run_training(gm, batch, Pipeline(stages, ("cuda:0", "cuda:1"), 2, "gpipe"))


def _placement(devices, simulated=False):
    pipe = Pipeline((("x",), ("y",)), tuple(devices), 2, "1f1b")
    return Placement(pipe.assignment(), "fp", list(devices), {"simulated_cluster": simulated}, pipeline=pipe)


def test_apply_runs_a_pipeline_over_this_machines_gpus_as_processes(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert pipeline_run_mode(_placement(["cuda:0", "cuda:1"])) == "processes"
    assert pipeline_run_mode(_placement(["cpu:0", "cpu:1"])) == "processes"
    # The same names on a simulated cluster are not this machine's GPUs.
    assert pipeline_run_mode(_placement(["cuda:0", "cuda:1"], simulated=True)).startswith("the placement")


def test_a_pipeline_over_gpus_this_machine_lacks_runs_unpipelined_and_says_why(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    why = pipeline_run_mode(_placement(["cuda:0", "cuda:1"]))
    assert "is not run as one" in why and "are not on this machine, which has 0 GPU(s)" in why
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert "mixes CPU workers (cpu:0) with GPUs (cuda:0)" in pipeline_run_mode(_placement(["cpu:0", "cuda:0"]))


def test_nccl_bootstrap_stays_on_loopback_for_a_local_job(monkeypatch):
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    assert nccl_environment("127.0.0.1") == {"NCCL_SOCKET_IFNAME": "lo"}
    assert nccl_environment("localhost") == {"NCCL_SOCKET_IFNAME": "lo"}
    assert nccl_environment("192.0.2.7") == {}  # an address the user gave: NCCL chooses as usual
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "eth1")
    assert nccl_environment("127.0.0.1") == {}  # the user's choice stands


class _DeviceReads(torch.nn.Module):
    """Reads ``x.device`` in the first stage and uses it in the second; names the CPU in a factory op."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)

    def forward(self, x):
        d = x.device
        h = self.a(x) + torch.ones(3, device=d)
        return (self.b(h) + torch.ones(3, device=d) + torch.zeros((x.shape[0], 3), device="cpu")).sum()


def test_a_stage_moved_onto_its_device_takes_what_the_capture_baked_as_a_device_with_it():
    """PipelineStage only records its device: a GPU stage kept its weights on the CPU, ran
    torch.export's device=cpu factory ops there and rebuilt an x.device from another stage
    as the CPU (review of the GPU path). The meta device stands in for a GPU here."""
    import torch.fx as fx

    from envs.runtime.pipeline.stages import StageModule, boundary_metas, split_stages
    from envs.runtime.pipeline.worker import onto_device

    gm = fx.symbolic_trace(_DeviceReads())
    x = torch.randn(2, 4)
    pipe = Pipeline(stages_of(gm, {"b"}), ("cpu:0", "cpu:1"), 1, "gpipe")
    specs = split_stages(gm, pipe)
    metas = boundary_metas(gm, {"x": x}, {v for s in specs for v in s.recv + s.send})
    stage = StageModule(specs[1], True, 1, ["x"], planned=metas)
    assert torch.device("cpu") in stage.constants.values()  # the x.device stage 0 read
    meta = torch.device("meta")
    assert onto_device(stage, meta) is stage
    assert stage.gm.b.weight.device == meta
    assert torch.device("cpu") not in stage.constants.values() and meta in stage.constants.values()
    named = [n.kwargs["device"] for n in stage.gm.graph.nodes if "device" in n.kwargs]
    assert named[-1] == meta and "device = device(type='meta')" in stage.gm.code  # the CPU the model named


class _Factories(torch.nn.Module):
    """Tensors made in the second stage with no device: ``torch.arange`` and a random draw."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = torch.nn.Linear(4, 3), torch.nn.Linear(3, 3)

    def forward(self, x):
        h = self.b(self.a(x))
        return (h + torch.arange(h.shape[1]) + torch.randn(h.shape[1])).sum()


def test_a_stage_moved_onto_its_device_makes_its_factories_tensors_there_and_keeps_its_draws():
    """fx records ``torch.arange(n)`` without a device: on a GPU stage it made a CPU tensor that
    the stage's GPU ops could not use. A random draw keeps drawing where the original does
    (the same numbers) and is copied over. The meta device stands in for a GPU here."""
    import torch.fx as fx

    from envs.runtime.apply import transfer_nodes
    from envs.runtime.pipeline.stages import StageModule, boundary_metas, split_stages
    from envs.runtime.pipeline.worker import onto_device

    gm = fx.symbolic_trace(_Factories())
    x = torch.randn(2, 4)
    specs = split_stages(gm, Pipeline(stages_of(gm, {"b"}), ("cpu:0", "cpu:1"), 1, "gpipe"))
    metas = boundary_metas(gm, {"x": x}, {v for s in specs for v in s.recv + s.send})
    stage = onto_device(StageModule(specs[1], True, 1, ["x"], planned=metas), torch.device("meta"))
    nodes = {n.name: n for n in stage.gm.graph.nodes}
    assert nodes["arange"].kwargs == {"device": torch.device("meta")}
    assert "device" not in nodes["randn"].kwargs
    assert [t.args[0] for t in transfer_nodes(stage.gm)] == [nodes["randn"]]


def test_a_job_of_another_world_size_is_refused_naming_both_before_a_rank_looks_up_its_device():
    """A torchrun job started with the wrong number of processes failed with an IndexError in
    rank_device (review of the GPU path)."""
    from envs.runtime.pipeline.worker import check_world

    pipe = Pipeline((("a",), ("b",)), ("cuda:0", "cuda:1"), 2, "1f1b", replicas=(("cuda:2", "cuda:3"),))
    check_world(pipe, 4)
    with pytest.raises(PipelineError, match=r"the pipeline needs 2 x 2 ranks; the job has 3"):
        check_world(pipe, 3)
