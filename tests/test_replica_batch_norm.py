"""BatchNorm synchronised over data-parallel replicas (envs/runtime/replica_batch_norm.py): the
replicas together compute the unsplit model's BatchNorm step, in threads (the split check) and
in worker processes (DDP, and a 2-stage pipeline replicated twice with one micro-batch)."""

from __future__ import annotations

import concurrent.futures
import copy

import pytest
import torch
from torch import nn

from envs.runtime.replica_batch_norm import LockstepGather, ReplicaBatchNorm, replace_batch_norms
from graphs.capture import capture
from graphs.model_file import ModelSpec


def _norm(cls, channels: int, affine: bool = True, momentum: float | None = 0.1) -> nn.Module:
    torch.manual_seed(1)
    bn = cls(channels, affine=affine, momentum=momentum).double()
    if affine:
        with torch.no_grad():
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-1.0, 1.0)
    return bn


def _replica_steps(bn: nn.Module, xs: list[torch.Tensor], grads: list[torch.Tensor], replicas: int, steps: int,
                   sync: bool = True):
    """Each step: the batch cut into ``replicas`` slices, each replica a thread with its own copy of
    ``bn``; returns per step (output, input gradient), and the copies."""
    lock = LockstepGather(replicas)
    copies = [ReplicaBatchNorm(copy.deepcopy(bn), lock.gather(r) if sync else (lambda t: t[None]))
              for r in range(replicas)]
    out = []
    for x, g in zip(xs, grads):
        parts = [p.clone().requires_grad_() for p in x.chunk(replicas)]
        gparts = g.chunk(replicas)

        def run(r: int) -> torch.Tensor:
            y = copies[r](parts[r])
            (y * gparts[r]).sum().backward()
            return y.detach()

        if sync:
            with concurrent.futures.ThreadPoolExecutor(replicas) as pool:
                ys = list(pool.map(run, range(replicas)))
        else:
            ys = [run(r) for r in range(replicas)]
        out.append((torch.cat(ys), torch.cat([p.grad for p in parts])))
    return out, copies


@pytest.mark.parametrize("cls, shape", [(nn.BatchNorm1d, (12, 5)), (nn.BatchNorm2d, (12, 3, 4, 4)),
                                        (nn.BatchNorm1d, (12, 4, 7))])
@pytest.mark.parametrize("replicas", [2, 3])
@pytest.mark.parametrize("affine, momentum", [(True, 0.1), (False, None)])
def test_replicas_compute_the_full_batchs_batchnorm_step_for_steps(cls, shape, replicas, affine, momentum):
    torch.manual_seed(0)
    xs = [torch.randn(*shape, dtype=torch.float64) * 3 + 2 for _ in range(3)]
    grads = [torch.randn(*shape, dtype=torch.float64) for _ in range(3)]
    full = _norm(cls, shape[1], affine, momentum)
    start = copy.deepcopy(full)
    expected = []
    for x, g in zip(xs, grads):
        xr = x.clone().requires_grad_()
        y = full(xr)
        (y * g).sum().backward()
        expected.append((y.detach(), xr.grad))
    got, copies = _replica_steps(start, xs, grads, replicas, steps=3)
    for (y, dx), (y_full, dx_full) in zip(got, expected):
        assert torch.allclose(y, y_full, rtol=0, atol=1e-12)
        assert torch.allclose(dx, dx_full, rtol=0, atol=1e-12)
    for rep in copies:  # every replica keeps the full batch's running statistics
        assert torch.allclose(rep.running_mean, full.running_mean, rtol=0, atol=1e-12)
        assert torch.allclose(rep.running_var, full.running_var, rtol=0, atol=1e-12)
        assert int(rep.num_batches_tracked) == int(full.num_batches_tracked) == 3
    if affine:  # local parameter gradients: their sum over the replicas is the full batch's
        assert torch.allclose(sum(r.weight.grad for r in copies), full.weight.grad, rtol=0, atol=1e-10)
        assert torch.allclose(sum(r.bias.grad for r in copies), full.bias.grad, rtol=0, atol=1e-10)


def test_without_the_sum_over_replicas_the_same_slices_give_another_step():
    """The test above can fail: each replica on its own normalises by its slice's statistics."""
    torch.manual_seed(0)
    x, g = torch.randn(12, 5, dtype=torch.float64) * 3 + 2, torch.randn(12, 5, dtype=torch.float64)
    full = _norm(nn.BatchNorm1d, 5)
    y_full = full(x.clone())
    (y, _), = _replica_steps(_norm(nn.BatchNorm1d, 5), [x], [g], 2, steps=1, sync=False)[0]
    assert (y - y_full).abs().max() > 1e-3


def test_a_swapped_batchnorm_keeps_the_parameters_buffers_and_names_of_the_one_it_replaces():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Sequential(nn.BatchNorm2d(4)))
    model[3][0].eval()  # frozen: it normalises by its running statistics, nothing to synchronise
    before = dict(model.named_parameters())
    state = list(model.state_dict())
    assert replace_batch_norms(model, lambda t: t[None]) == ["1"]
    assert isinstance(model[1], ReplicaBatchNorm) and isinstance(model[3][0], nn.BatchNorm2d)
    assert list(model.state_dict()) == state
    assert all(p is before[n] for n, p in model.named_parameters())


def test_a_replica_whose_peer_fails_raises_instead_of_waiting_for_it():
    import threading
    import time

    lock = LockstepGather(2, timeout_s=60)
    threading.Timer(0.2, lock.abort).start()  # replica 1 failed before its first gather
    started = time.perf_counter()
    with pytest.raises(threading.BrokenBarrierError):
        lock.gather(0)(torch.ones(1))
    assert time.perf_counter() - started < 30


def _bn_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.Conv2d(6, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _mean_loss(output: torch.Tensor, _x: torch.Tensor) -> torch.Tensor:
    return output.square().mean()


def _unsplit_losses(model: nn.Module, x: torch.Tensor, steps: int) -> list[float]:
    """The losses of ``steps`` SGD steps (run_training's default, lr 0.1) of ``model`` on the whole
    batch, in this process; ``model`` is trained."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    for _ in range(steps):
        opt.zero_grad()
        loss = _mean_loss(model(x), x)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def test_the_split_check_passes_ddp_replicas_of_a_batchnorm_model_and_says_they_are_synchronised():
    from envs.runtime.check import check_batch_split

    model = _bn_cnn()
    spec = ModelSpec(model=model, example_inputs=(torch.randn(8, 3, 6, 6),), name="cnn", loss_fn=_mean_loss)
    cap = capture(model, spec.example_inputs, name="cnn")
    ddp = check_batch_split(spec, cap, microbatches=1, replicas=2)
    assert ddp.split_ok and ddp.split_synced_norms == 2
    assert "with their 2 BatchNorm(s) synchronised over the replicas" in ddp.describe_split()
    piped = check_batch_split(spec, cap, microbatches=2, replicas=2)
    assert not piped.split_ok and "BatchNorm in training mode" in piped.describe_split()


@pytest.mark.parametrize("layout", ["ddp", pytest.param("2 stages x 2 replicas", marks=pytest.mark.slow)])
def test_ddp_and_a_replicated_pipeline_train_a_batchnorm_model_as_the_full_batch_does(layout):
    """Worker processes over gloo: the losses and the parameters after three SGD steps equal the
    unsplit model's on the whole batch, running statistics included in what the steps see."""
    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline

    model = _bn_cnn()
    torch.manual_seed(0)
    x = torch.randn(8, 3, 6, 6)
    cap = capture(copy.deepcopy(model), (x,), name="cnn")
    gm = cap.gm
    inputs = {next(n.name for n in gm.graph.nodes if n.op == "placeholder"): x}
    if layout == "ddp":
        run = run_training(gm, inputs, world=2, steps=3, loss_fn=_mean_loss, timeout_s=120)
    else:
        compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
        cut = len(compute) // 2
        pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 1, "gpipe",
                        (("cpu:2", "cpu:3"),))
        run = run_training(gm, inputs, pipe, steps=3, loss_fn=_mean_loss, timeout_s=120)
    assert run.losses == pytest.approx(_unsplit_losses(model, x, 3), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(run.params[name], p.detach(), rtol=1e-4, atol=1e-6), name


SYNC_BN_FILE = """
import torch
from torch import nn

def get_model():
    torch.manual_seed(0)
    return nn.SyncBatchNorm.convert_sync_batchnorm(nn.Sequential(
        nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 6, 3, padding=1),
        nn.BatchNorm2d(6), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4)))

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(8, 3, 6, 6),)
"""


@pytest.mark.slow
def test_a_syncbatchnorm_model_placed_over_worker_ranks_and_pipelined_without_replicas_runs_as_one_process(tmp_path):
    """Under the job's process group SyncBatchNorm tried to sync with ranks holding other layers and
    raised 'SyncBatchNorm expected input tensor to be on GPU': every placement and pipeline of
    such a model failed when measured. Without replicas it is the BatchNorm the placed model runs."""
    from envs.runtime.distributed.measure import DistributedMeasurer
    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline
    from graphs.pipeline import prepare

    path = tmp_path / "syncbn.py"
    path.write_text(SYNC_BN_FILE)
    prep = prepare(str(path), {}, profile=False)
    gm = prep.captured.gm
    compute = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = len(compute) // 2
    halves = {name: f"cpu:{int(i >= cut)}" for i, name in enumerate(compute)}
    measurer = DistributedMeasurer(str(path), {}, "cpu:0,cpu:1", warmup=1, repeats=2, spec=prep.spec,
                                   captured=prep.captured, fingerprint=prep.captured.fingerprint)
    [placed] = measurer.measure([halves])
    assert placed.valid, placed.reason

    model, (x,) = prep.spec.model, prep.spec.example_inputs
    inputs = {next(n.name for n in gm.graph.nodes if n.op == "placeholder"): x}
    pipe = Pipeline((tuple(compute[:cut]), tuple(compute[cut:])), ("cpu:0", "cpu:1"), 1, "gpipe")
    run = run_training(copy.deepcopy(gm), inputs, pipe, steps=2, loss_fn=_mean_loss, timeout_s=120)
    assert run.losses == pytest.approx(_unsplit_losses(copy.deepcopy(model), x, 2), rel=1e-5)
