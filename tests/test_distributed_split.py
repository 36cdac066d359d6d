"""envs.runtime.split and the per-rank schedule of envs.runtime.distributed.runtime, in one process.

The schedule is exercised with ranks as threads exchanging tensors over queues (no
torch.distributed, no process start-up), against the plain single-process training step.
"""

from __future__ import annotations

import copy
import queue
import threading

import pytest
import torch
import torch.fx as fx
from hypothesis import given, settings
from hypothesis import strategies as st

from envs.hardware.rank_devices import (
    RankDeviceError,
    is_rank_device_list,
    parse_rank_devices,
)
from envs.runtime.distributed.runtime import Comm, RankStep, value_meta
from envs.runtime.distributed.stage_state import (
    hold,
    module_tensors,
    owned_paths,
    resident_bytes,
    tensor_bytes,
    to_meta,
)
from envs.runtime.split import SplitError, split_by_rank
from tests.helpers.runtime_models import ActivationUpdatedAfterItIsRead, MaskUpdatedAfterItIsRead


class _Net(torch.nn.Module):
    """Branches, a tuple-valued op, an int from .size(), tied weights and an integer input."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(11, 8)
        self.a = torch.nn.Linear(8, 8)
        self.b = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(16, 8)
        self.norm = torch.nn.LayerNorm(8)

    def forward(self, tokens: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        h1 = torch.relu(self.a(x))
        h2 = torch.tanh(self.b(x)) * scale
        parts = torch.chunk(torch.cat([h1, h2], -1), 2, dim=-1)
        y = self.c(torch.cat([parts[1], parts[0]], -1)) + h1
        n = y.size(-1)
        y = self.norm(y) / n
        return y @ self.emb.weight.t()  # tied output projection


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = _Net()
    inputs = (torch.randint(0, 11, (3, 5)), torch.rand(1, requires_grad=False))
    gm = fx.symbolic_trace(model)
    return gm, inputs


def _loss(out, *inputs):
    return out.square().mean()


class _QueueComm(Comm):
    """Ranks as threads: one FIFO per (src, dst) pair keeps messages in send order, like NCCL."""

    def __init__(self, rank: int, boxes: dict) -> None:
        self.rank, self.boxes = rank, boxes

    def isend(self, tensor, dst):
        self.boxes[(self.rank, dst)].put(tensor.detach().clone())

        class _Done:
            def wait(self) -> None:
                pass

        return _Done()

    def recv(self, tensor, src):
        got = self.boxes[(src, self.rank)].get(timeout=20)
        assert got.shape == tensor.shape and got.dtype == tensor.dtype, "messages matched out of order"
        tensor.copy_(got)


def _reference(gm, inputs, steps, loss_fn=_loss):
    ref = copy.deepcopy(gm)
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(ref(*inputs), *inputs)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, dict(ref.named_parameters())


def _run_threads(gm, inputs, ranks, world, steps, loss_fn=_loss):
    """Each rank (a thread) holds its own copy of the model with only its stages' tensors
    materialised, as a worker process does; returns the plan, the losses and every rank's
    own parameters after ``steps``."""
    source = {p: t.detach().clone() for p, t in module_tensors(gm)}
    meta = value_meta(copy.deepcopy(gm), inputs)
    copies, plans = [], []
    for rank in range(world):
        mine = copy.deepcopy(gm)
        to_meta(mine)
        hold(mine, owned_paths(split_by_rank(mine, ranks, world), rank), source, "cpu")
        copies.append(mine)
        plans.append(split_by_rank(mine, ranks, world))
    plan = plans[0]
    boxes = {(a, b): queue.Queue() for a in range(world) for b in range(world) if a != b}
    losses: dict[int, list] = {r: [] for r in range(world)}
    errors: list[BaseException] = []

    def work(rank: int) -> None:
        plan = plans[rank]
        try:
            params = {id(p): p for s in plan.stages_of(rank) for p in s.module.parameters()}
            opt = torch.optim.SGD(list(params.values()), lr=0.1, momentum=0.9) if params else None
            step = RankStep(plan, rank, meta, inputs, loss_fn, "cpu", _QueueComm(rank, boxes))
            for _ in range(steps):
                if opt:
                    opt.zero_grad(set_to_none=True)
                losses[rank].append(step.step())
                if opt:
                    opt.step()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads), "the schedule deadlocked"
    if errors:
        raise errors[0]
    assert all(q.empty() for q in boxes.values()), "messages left unread"
    params = {}
    for mine in copies:
        held = {k: p for k, p in mine.named_parameters() if p.device.type != "meta"}
        assert not set(held) & set(params), "a parameter is held by two ranks"
        params.update(held)
    return plan, losses[plan.output_rank], params


def _node_names(gm):
    return [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]


def _module_aligned(gm, pick):
    """Placement where every module's nodes share a rank (tied weights follow emb)."""
    names = _node_names(gm)
    return {n: pick(i) for i, n in enumerate(names)}


def test_contiguous_split_matches():
    gm, inputs = _setup()
    names = _node_names(gm)
    ranks = {n: int(i >= len(names) // 2) for i, n in enumerate(names)}
    plan, losses, params = _run_threads(gm, inputs, ranks, 2, steps=3)
    ref_losses, ref_params = _reference(gm, inputs, 3)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-5, atol=1e-6)


def _gradient_penalty(out, x):
    (g,) = torch.autograd.grad(out.sum(), x, create_graph=True)
    return out.mean() + ((g.norm(dim=1) - 1) ** 2).mean()


def test_a_loss_differentiating_through_the_model_runs_when_one_rank_holds_it_all():
    """A WGAN-GP critic's loss takes the gradient of the output by the input. Its rank runtime
    handed the loss a leaf copy of the output even with every op on one rank, so no placement
    over worker processes ran, the one-process reference neither, and placer recommended DDP
    (5.19 ms measured) where one process ran the step in 1.25 ms. (A cut still refuses it:
    tests/test_cut_output_loss.py.)"""
    torch.manual_seed(0)
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)))
    inputs = (torch.randn(6, 4, requires_grad=True),)
    names = _node_names(gm)
    plan, losses, params = _run_threads(gm, inputs, {n: 0 for n in names}, 2, steps=3, loss_fn=_gradient_penalty)
    ref_losses, ref_params = _reference(gm, inputs, 3, loss_fn=_gradient_penalty)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-5, atol=1e-6)


def test_a_chain_cut_once_is_one_stage_per_rank():
    chain = fx.symbolic_trace(torch.nn.Sequential(*[torch.nn.Linear(4, 4) for _ in range(6)]))
    names = _node_names(chain)
    plan = split_by_rank(chain, {n: int(i >= 3) for i, n in enumerate(names)}, 2, output_rank=1)
    assert [s.rank for s in plan.stages] == [0, 1]
    assert [(t.value, t.src_rank, t.dst_rank) for t in plan.transfers] == [(names[2], 0, 1), (names[5], 1, 1)]


def test_sends_leave_early_and_receives_start_stages():
    """Two unrolled layers on two ranks: each step of layer 0 is its own stage, sent as soon
    as it is computed, and each step of layer 1 starts when its input arrives (a wavefront)."""

    class TwoLayers(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.l0 = torch.nn.Linear(4, 4)
            self.l1 = torch.nn.Linear(8, 4)

        def forward(self, x):
            h0, steps0 = x, []
            for _ in range(4):
                h0 = torch.tanh(self.l0(h0))
                steps0.append(h0)
            h1, outs = torch.zeros_like(x), []
            for s in steps0:  # layer 1 runs after all of layer 0 in graph order
                h1 = torch.tanh(self.l1(torch.cat([s, h1], -1)))
                outs.append(h1)
            return torch.stack(outs)

    gm = fx.symbolic_trace(TwoLayers())
    names = _node_names(gm)
    first_l1 = names.index("zeros_like")
    ranks = {n: int(i >= first_l1) for i, n in enumerate(names)}
    plan = split_by_rank(gm, ranks, 2)
    r0, r1 = plan.stages_of(0), plan.stages_of(1)
    # Rank 0: one stage per step of layer 0, each ending with the value rank 1 reads.
    assert [s.outputs for s in r0] == [["tanh"], ["tanh_1"], ["tanh_2"], ["tanh_3"]]
    # Rank 1: one stage per received step (a wavefront), not one stage waiting for all four.
    stage_of = {n: s.index for s in r1 for n in s.nodes}
    assert len({stage_of[f"cat{k}"] for k in ("", "_1", "_2", "_3")}) == 4
    assert all(t.src_stage < t.dst_stage for t in plan.transfers)
    x = torch.randn(2, 4)
    ref = TwoLayers()
    ref.load_state_dict(gm.state_dict())
    _, losses, _ = _run_threads(gm, (x,), ranks, 2, steps=1)
    assert losses[0] == pytest.approx(float(_loss(ref(x), x).detach()), rel=1e-6)


@settings(max_examples=8, deadline=None)
@given(st.lists(st.integers(0, 2), min_size=40, max_size=40), st.integers(2, 3))
def test_random_placements_match_single_process(choice, world):
    gm, inputs = _setup()
    ranks = _module_aligned(gm, lambda i: choice[i % len(choice)] % world)
    plan, losses, params = _run_threads(gm, inputs, ranks, world, steps=3)
    ref_losses, ref_params = _reference(gm, inputs, 3)
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-4, atol=1e-6)


def test_stages_are_acyclic_and_cover_every_node():
    gm, _ = _setup()
    names = _node_names(gm)
    ranks = {n: i % 2 for i, n in enumerate(names)}
    plan = split_by_rank(gm, ranks, 2)
    covered = [n for s in plan.stages for n in s.nodes]
    assert sorted(covered) == sorted(names)
    for t in plan.transfers:
        assert t.src_stage < t.dst_stage
    assert [s.index for s in plan.stages] == list(range(len(plan.stages)))
    assert plan.world_size == 2 and len(plan.stages) > 2


def test_tied_weight_follows_its_module():
    gm, _ = _setup()
    names = _node_names(gm)
    ranks = {n: 0 for n in names}
    getattrs = [n.name for n in gm.graph.nodes if n.op == "get_attr"]
    assert getattrs, "the test model reads emb.weight with get_attr"
    for n in getattrs:
        ranks[n] = 1
    plan = split_by_rank(gm, ranks, 2)
    owner = {n: s.rank for s in plan.stages for n in s.nodes}
    assert all(owner[n] == 0 for n in getattrs)


def test_bad_placements_are_refused_clearly():
    gm, _ = _setup()
    names = _node_names(gm)
    with pytest.raises(SplitError, match="not in the model's graph"):
        split_by_rank(gm, {"nope": 0}, 2)
    with pytest.raises(SplitError, match=r"rank 5.*\[0, 2\)"):
        split_by_rank(gm, {names[0]: 5}, 2)
    with pytest.raises(SplitError, match="world_size"):
        split_by_rank(gm, {}, 0)


def test_a_module_called_on_two_ranks_is_refused():
    class Twice(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(torch.relu(self.lin(x)))

    gm = fx.symbolic_trace(Twice())
    calls = [n.name for n in gm.graph.nodes if n.op == "call_module"]
    with pytest.raises(SplitError, match="one module must be placed on one rank"):
        split_by_rank(gm, {calls[0]: 0, calls[1]: 1}, 2)


def test_parse_rank_devices():
    devs = parse_rank_devices("cpu:0, cpu:1,node2:cuda:0,localhost:cpu:2")
    assert [d.rank for d in devs] == [0, 1, 2, 3]
    assert [d.host for d in devs] == ["", "", "node2", ""]
    assert devs[2].torch_device == "cuda:0" and not devs[2].local and devs[3].local
    with pytest.raises(RankDeviceError, match="listed twice"):
        parse_rank_devices("cpu:0,localhost:cpu:0")
    with pytest.raises(RankDeviceError, match="HOST:cpu:N"):
        parse_rank_devices("cpu:0,gpu1")
    with pytest.raises(RankDeviceError, match="no devices"):
        parse_rank_devices(" , ")
    assert is_rank_device_list("cpu:0,cpu:1")
    assert is_rank_device_list("a:cuda:0,b:cuda:0")
    assert not is_rank_device_list("cuda:0,cuda:1")
    assert not is_rank_device_list("cpu,cuda:0")


def test_a_rank_holds_only_its_stages_tensors_and_ties_survive():
    gm, _ = _setup()
    names = _node_names(gm)
    # emb (and the tied output projection that reads emb.weight) on rank 0, the rest on rank 1.
    ranks = {n: 0 if n in ("emb", "emb_weight", "t", "matmul") else 1 for n in names}
    ranks.update({n.name: 0 for n in gm.graph.nodes if n.op == "get_attr"})
    source = {p: t.detach().clone() for p, t in module_tensors(gm)}
    total = tensor_bytes(t for _, t in module_tensors(gm))
    held = []
    for rank in range(2):
        mine = copy.deepcopy(gm)
        to_meta(mine)
        assert resident_bytes(mine) == 0
        paths = owned_paths(split_by_rank(mine, ranks, 2), rank)
        nbytes = hold(mine, paths, source, "cpu")
        assert resident_bytes(mine) == nbytes == tensor_bytes(source[p] for p in paths)
        real = {k for k, p in mine.named_parameters() if p.device.type != "meta"}
        assert real == {p for p in paths if p in dict(gm.named_parameters())}
        for k in real:
            torch.testing.assert_close(dict(mine.named_parameters())[k], source[k], rtol=0, atol=0)
        held.append((mine, real, nbytes))
    assert held[0][1] == {"emb.weight"}
    assert held[0][2] + held[1][2] == total, "every tensor is held by exactly one rank"


class TiedEmbeddingOutput(torch.nn.Module):
    """An embedding whose weight is also the output projection's (two modules, one tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.out = torch.nn.Linear(3, 5, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, x):
        return self.out(self.emb(x))


def test_hold_keeps_a_tie_between_two_paths():
    model = TiedEmbeddingOutput()
    source = {p: t.detach().clone() for p, t in module_tensors(model)}
    to_meta(model)
    assert model.out.weight is model.emb.weight and model.emb.weight.device.type == "meta"
    nbytes = hold(model, {"out.weight"}, source, "cpu")
    assert model.out.weight is model.emb.weight and model.emb.weight.device.type == "cpu"
    assert nbytes == 5 * 3 * 4


def test_two_modules_sharing_a_weight_on_two_ranks_are_refused():
    gm = fx.symbolic_trace(TiedEmbeddingOutput())
    with pytest.raises(SplitError, match="one module must be placed on one rank"):
        split_by_rank(gm, {"emb": 0, "out": 1}, 2)


def _traced(model: torch.nn.Module) -> fx.GraphModule:
    from graphs.capture import capture

    torch.manual_seed(0)
    return capture(model, (torch.randn(6, 8),)).gm


class _EmaReadOnAnotherRank(torch.nn.Module):
    """A buffer updated in place in forward(): read on rank 1, it left rank 0 before its update."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 2)
        self.register_buffer("ema", torch.zeros(8))

    def forward(self, x):
        h = self.a(x)
        self.ema.mul_(0.9).add_(h.detach().mean(0), alpha=0.1)
        return self.c(torch.tanh(h) + self.ema)


@pytest.mark.parametrize("model, on_rank_1", [
    (_EmaReadOnAnotherRank, {"add", "c"}),  # rank 1 trained with the EMA of the step before (walkthrough)
    (MaskUpdatedAfterItIsRead, {"a", "add", "mul", "c"}),  # the mask's old values would reach rank 1
    (ActivationUpdatedAfterItIsRead, {"sum_1", "c", "add"}),  # and here h's
    (ActivationUpdatedAfterItIsRead, {"sum_1"}),  # mul_ would update a fresh leaf in rank 0's next stage
])
def test_a_value_updated_in_place_after_it_leaves_its_stage_is_refused(model, on_rank_1):
    gm = _traced(model())
    ranks = {n.name: int(n.name in on_rank_1) for n in gm.graph.nodes if n.op != "placeholder"}
    with pytest.raises(SplitError, match="updates .* in place after the value left its stage"):
        split_by_rank(gm, ranks, 2)


@pytest.mark.parametrize("model, on_rank_1", [
    (_EmaReadOnAnotherRank, {"add", "c"}),
    (MaskUpdatedAfterItIsRead, {"a", "add", "mul", "c"}),
    (ActivationUpdatedAfterItIsRead, {"sum_1", "c", "add"}),
    (ActivationUpdatedAfterItIsRead, {"sum_1"}),
])
def test_the_rank_simulator_refuses_the_cuts_the_runtime_refuses_with_its_words(model, on_rank_1):
    """A search over ranks must never pick a placement that ``apply`` then refuses: the
    simulator scores it infinite, with the split's own reason."""
    from envs.sim.rank_plan import rank_plan
    from envs.sim.rank_simulator import RankSimulator
    from graphs.capture import capture
    from tests.helpers.problems import ranks_cluster

    torch.manual_seed(0)
    cap = capture(model(), (torch.randn(6, 8),))
    ranks = {n.name: int(n.name in on_rank_1) for n in cap.gm.graph.nodes if n.op not in ("placeholder", "output")}
    with pytest.raises(SplitError) as refused:
        split_by_rank(cap.gm, ranks, 2)
    assert rank_plan(cap.graph, ranks, 2).refusal == str(refused.value)
    assert RankSimulator(cap.graph, ranks_cluster()).step_times([ranks]).tolist() == [float("inf")]


def test_the_rank_simulator_runs_a_value_updated_in_place_before_it_leaves_its_stage():
    from envs.sim.rank_plan import rank_plan
    from envs.sim.rank_simulator import RankSimulator
    from graphs.capture import capture
    from tests.helpers.problems import ranks_cluster

    cap = capture(_ActivationUpdatedBeforeItIsRead(), (torch.randn(6, 8),))
    ranks = {n.name: int(n.name == "c") for n in cap.gm.graph.nodes if n.op not in ("placeholder", "output")}
    assert rank_plan(cap.graph, ranks, 2).refusal is None
    assert 0 < RankSimulator(cap.graph, ranks_cluster()).step_times([ranks])[0] < float("inf")


class _ActivationUpdatedBeforeItIsRead(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(8, 8)
        self.c = torch.nn.Linear(8, 2)

    def forward(self, x):
        h = torch.relu_(self.a(x))
        return self.c(h)


def test_a_value_updated_in_place_before_it_leaves_its_stage_splits():
    gm = _traced(_ActivationUpdatedBeforeItIsRead())
    ranks = {n.name: int(n.name == "c") for n in gm.graph.nodes if n.op != "placeholder"}
    plan = split_by_rank(gm, ranks, 2)  # relu_'s result leaves after the update
    assert [t.value for t in plan.transfers if t.dst_rank == 1] == ["relu_"]


class _ReassignedCounter(torch.nn.Module):
    """``self.calls = self.calls + 1``: torch.export writes it back with copy_ at the graph's end."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self.a = torch.nn.Linear(8, 2)

    def forward(self, x):
        self.calls = self.calls + 1
        return self.a(x)


def test_a_buffer_is_held_by_the_rank_of_the_op_that_updates_it_in_place():
    from graphs.capture import capture

    torch.manual_seed(0)
    cap = capture(_ReassignedCounter(), (torch.randn(6, 8),))
    assert cap.method == "export"
    gm = cap.gm
    write = next(n.name for n in gm.graph.nodes if "copy_" in str(n.target))
    ranks = {n.name: int(n.name in {"add", write}) for n in gm.graph.nodes if n.op != "placeholder"}
    plan = split_by_rank(gm, ranks, 2)  # the buffer read on rank 0 would be updated on a copy on rank 1
    holder = next(s for s in plan.stages if "calls" in s.nodes)
    assert holder.rank == 1


class _TiedHeadByAttribute(torch.nn.Module):
    """GPT-2's tie: the output projection reads the embedding's weight as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = torch.nn.Embedding(5, 3)
        self.mix = torch.nn.Linear(3, 3)

    def forward(self, x):
        return torch.nn.functional.linear(self.mix(self.emb(x)), self.emb.weight)


def _stages(plan) -> list[tuple[int, list[str]]]:
    return [(s.rank, list(s.nodes)) for s in plan.stages]


@pytest.mark.parametrize("model, example, on_rank_1", [
    (_ReassignedCounter, (torch.randn(6, 8),), ("add", "copy_")),  # the buffer follows its update to rank 1
    (_TiedHeadByAttribute, (torch.tensor([[0, 1, 4]]),), ("emb_weight", "linear")),  # the weight stays with emb
])
def test_the_rank_simulator_moves_state_as_the_runtime_does(model, example, on_rank_1):
    """A hand-made placement over ranks has the stages the runtime will run, so ``show``
    simulates the step that ``apply`` then runs."""
    from envs.sim.rank_plan import rank_plan
    from graphs.capture import capture

    torch.manual_seed(0)
    cap = capture(model(), example)
    chosen = {n.name for n in cap.gm.graph.nodes if any(k in n.name or k in str(n.target) for k in on_rank_1)}
    ranks = {n.name: int(n.name in chosen) for n in cap.gm.graph.nodes if n.op not in ("placeholder", "output")}
    expected = _stages(split_by_rank(cap.gm, ranks, 2))
    assert _stages(rank_plan(cap.graph, ranks, 2)) == expected


def test_the_rank_simulator_refuses_two_modules_sharing_a_weight_on_two_ranks():
    from envs.sim.rank_plan import rank_plan
    from graphs.capture import capture

    # Named a leaf, the head stays a module holding the embedding's tensor (graphs.tied_layers
    # traces it through otherwise).
    cap = capture(TiedEmbeddingOutput(), (torch.tensor([[0, 1, 4]]),), leaf_modules=["out"])
    with pytest.raises(SplitError) as refused:
        split_by_rank(cap.gm, {"emb": 0, "out": 1}, 2)
    assert rank_plan(cap.graph, {"emb": 0, "out": 1}, 2).refusal == str(refused.value)


def test_a_head_traced_through_reads_the_embeddings_weight_on_another_rank_as_the_runtime_does():
    from envs.sim.rank_plan import rank_plan
    from graphs.capture import capture

    cap = capture(TiedEmbeddingOutput(), (torch.tensor([[0, 1, 4]]),))
    assert "out" not in {n.name for n in cap.gm.graph.nodes}  # a get_attr of emb.weight and a linear
    ranks = {n.name: int(n.name == "linear") for n in cap.gm.graph.nodes if n.op not in ("placeholder", "output")}
    expected = _stages(split_by_rank(cap.gm, ranks, 2))
    assert rank_plan(cap.graph, ranks, 2).refusal is None
    assert _stages(rank_plan(cap.graph, ranks, 2)) == expected


class _SecondDerivative(torch.nn.Module):
    """A physics-informed residual: two torch.autograd.grad calls by the input, in forward."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(2, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.scale = torch.nn.Linear(1, 1)

    def forward(self, xt):
        xt = xt.requires_grad_(True)
        du = torch.autograd.grad(self.net(xt).sum(), xt, create_graph=True)[0]
        u_x, u_t = du[:, :1], du[:, 1:]
        u_xx = torch.autograd.grad(u_x.sum(), xt, create_graph=True)[0][:, :1]
        return u_t - self.scale(u_xx)


def test_no_stage_is_cut_inside_what_an_autograd_grad_differentiates():
    """Rank 0 was cut into two stages after its first send, inside the second grad's region; a
    stage's inputs are fresh leaves, so the grad raised 'The differentiated Tensor at index 0
    appears to not have been used in the graph'. The rank simulator cuts the same stages."""
    from envs.sim.rank_plan import rank_plan
    from graphs.capture import capture

    torch.manual_seed(0)
    x = torch.rand(6, 2)
    cap = capture(_SecondDerivative(), (x.clone(),))
    gm = cap.gm
    tail = {"scale", "sub"}
    ranks = {n: int(n in tail) for n in _node_names(gm)}
    plan = split_by_rank(gm, ranks, 2)
    assert [s.rank for s in plan.stages] == [0, 1]
    simulated = rank_plan(cap.graph, ranks, 2)
    assert [(s.rank, list(s.nodes)) for s in simulated.stages] == [(s.rank, s.nodes) for s in plan.stages]
    _, losses, params = _run_threads(gm, (x.clone(),), ranks, 2, steps=2)
    ref_losses, ref_params = _reference(gm, (x.clone(),), 2)
    assert losses == pytest.approx(ref_losses, rel=1e-6)
    for k, p in ref_params.items():
        torch.testing.assert_close(params[k], p, rtol=1e-5, atol=1e-6)


def test_a_joined_run_keeps_every_node_between_its_first_and_last_on_a_rank_in_one_stage():
    from envs.sim.stages import cut_stages

    order = ["a", "s", "b", "c"]
    inputs = {"a": [], "s": ["a"], "b": ["a"], "c": ["b"]}
    rank = {"a": 0, "s": 0, "b": 0, "c": 0}
    # "s" is read by the output on rank 1: a send, after which rank 0 would start a new stage
    free = cut_stages(order, inputs, rank, ["s", "c"], 1)
    assert free["b"] != free["a"]
    joined = cut_stages(order, inputs, rank, ["s", "c"], 1, [["a", "c"]])
    assert len({joined[n] for n in order}) == 1
