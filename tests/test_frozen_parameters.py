"""Frozen parameters and buffers: held in memory, but no gradient, optimizer state or all-reduce.

A LoRA fine-tune or a frozen backbone trains a small share of its parameters: DDP all-reduces
only gradients that exist, and the optimizer keeps state for trained parameters only.
"""

import networkx as nx
import pytest
import torch
from torch import nn

from envs.hardware.cluster import Device, Link, make_cluster
from envs.sim.data_parallel import simulate_data_parallel
from envs.sim.problem_compile import compile_problem
from graphs.capture import capture

MB = 2**20


class Adapted(nn.Module):
    """A frozen base layer with a trainable low-rank adapter beside it, and a BatchNorm's buffers."""

    def __init__(self):
        super().__init__()
        self.base = nn.Linear(64, 64)
        self.base.requires_grad_(False)
        self.down, self.up = nn.Linear(64, 4, bias=False), nn.Linear(4, 64, bias=False)
        self.norm = nn.BatchNorm1d(64)

    def forward(self, x):
        return self.norm(self.base(x) + self.up(self.down(x)))


def test_the_placement_graph_counts_frozen_parameters_and_buffers_as_frozen_bytes():
    cap = capture(Adapted(), (torch.randn(8, 64),), name="adapted")
    nodes = {a["target"]: a for _, a in cap.graph.nodes(data=True) if a["op"] == "call_module"}
    assert nodes["base"]["frozen_bytes"] == nodes["base"]["param_bytes"] == (64 * 64 + 64) * 4
    assert nodes["down"]["frozen_bytes"] == 0 and nodes["down"]["param_bytes"] == 64 * 4 * 4
    norm = nodes["norm"]
    assert norm["frozen_bytes"] == 2 * 64 * 4 + 8  # running mean and variance, num_batches_tracked
    assert norm["param_bytes"] - norm["frozen_bytes"] == 2 * 64 * 4  # weight and bias


def _cluster(n: int = 2):
    devs = [Device(f"gpu{i}", "V100", 2**34, 1e13, 5e11) for i in range(n)]
    return make_cluster(devs, [Link(f"gpu{i}", f"gpu{j}", 1e-5, 1e10) for i in range(n) for j in range(i + 1, n)],
                        name="gpus")


def _chain(frozen: float) -> nx.DiGraph:
    """Four layers of 64 MiB each, ``frozen`` of each layer's bytes frozen."""
    g = nx.DiGraph()
    g.add_node("x", op="placeholder", out_bytes=1000, requires_grad=False)
    prev = "x"
    for i in range(4):
        g.add_node(f"l{i}", op="call_module", fwd_time={"V100": 1e-3}, bwd_time={"V100": 2e-3}, out_bytes=1000,
                   requires_grad=True, param_bytes=64 * MB, frozen_bytes=frozen * 64 * MB)
        g.add_edge(prev, f"l{i}", bytes=1000)
        prev = f"l{i}"
    g.add_node("output", op="output", out_bytes=0, requires_grad=False)
    g.add_edge(prev, "output", bytes=1000)
    return g


def test_a_frozen_parameter_pins_its_own_bytes_only():
    trained, frozen = (compile_problem(_chain(f), _cluster(), optimizer="adam") for f in (0.0, 1.0))
    layer = trained.node_index("l0")
    assert trained.static_memory()[layer] == pytest.approx(64 * MB * trained.static_bytes_per_param_byte)
    assert frozen.static_memory()[layer] == pytest.approx(64 * MB)


def test_ddp_all_reduces_only_the_gradients_of_trained_parameters():
    results = {f: simulate_data_parallel(compile_problem(_chain(f), _cluster(), optimizer="adam"), 2)
               for f in (0.0, 0.75, 1.0)}
    assert sum(results[0.0].bucket_bytes) == pytest.approx(4 * 64 * MB)
    assert sum(results[0.75].bucket_bytes) == pytest.approx(4 * 16 * MB)
    assert sum(results[1.0].bucket_bytes) == 0
    assert results[1.0].step_time < results[0.75].step_time < results[0.0].step_time


class FrozenWide(nn.Module):
    """Six 512-wide layers, the first four frozen (batch 4: the parameters dominate memory)."""

    def __init__(self):
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(512, 512) for _ in range(6)])
        self.layers[:4].requires_grad_(False)

    def forward(self, x):
        return self.layers(x)


def test_the_simulated_peak_of_a_mostly_frozen_model_is_what_the_allocator_measures():
    import numpy as np

    from envs.hardware.loading import load_cluster
    from envs.sim.reference_simulator import simulate_reference
    from envs.sim.simulator import simulate
    from graphs.saved_activations import measure_step_peak

    torch.manual_seed(0)
    inputs = (torch.randn(4, 512),)
    captured = capture(FrozenWide(), inputs, name="frozen_wide")
    measured = measure_step_peak(FrozenWide(), inputs, lambda out, x: out.square().mean(),
                                 lambda p: torch.optim.Adam(p, lr=1e-3))
    cluster = load_cluster({"name": "1xcpu", "devices": [
        {"name": "cpu", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}]})
    problem = compile_problem(captured.graph, cluster, optimizer="adam")
    simulated = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
    reference = simulate_reference(captured.graph, cluster, {v: "cpu" for v in captured.graph}, optimizer="adam")
    assert reference.peak_memory.tolist() == [simulated]
    # Counted as trained, the four frozen layers' gradients and Adam state made it 2.0x the measured peak.
    assert measured <= simulated <= 1.25 * measured


class SparseRecommender(nn.Module):
    """A large embedding table with sparse gradients (DLRM's), and a small MLP over it."""

    def __init__(self, rows: int = 200_000):
        super().__init__()
        self.table = nn.EmbeddingBag(rows, 64, mode="sum", sparse=True)
        self.top = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, idx):
        return self.top(self.table(idx)).squeeze(1)


def test_a_sparse_embeddings_gradient_is_the_rows_it_looked_up_not_the_table():
    import numpy as np

    from envs.hardware.loading import load_cluster
    from envs.sim.reference_simulator import simulate_reference
    from envs.sim.simulator import simulate
    from graphs.saved_activations import measure_step_peak

    torch.manual_seed(0)
    idx = torch.randint(0, 200_000, (256, 8))
    captured = capture(SparseRecommender(), (idx,), name="sparse_rec")
    table = next(a for _, a in captured.graph.nodes(data=True) if a.get("target") == "table")
    assert table["sparse_param_bytes"] == 200_000 * 64 * 4
    assert table["sparse_grad_bytes"] == 256 * 8 * (64 * 4 + 8)
    cluster = load_cluster({"name": "1xcpu", "devices": [
        {"name": "cpu", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}]})
    for kind, optimizer_fn in (("sgd", lambda p: torch.optim.SGD(p, lr=0.1)),
                               ("adagrad", lambda p: torch.optim.Adagrad(p, lr=0.1))):
        measured = measure_step_peak(SparseRecommender(), (idx,), lambda out, i: out.square().mean(), optimizer_fn)
        problem = compile_problem(captured.graph, cluster, optimizer=kind)
        simulated = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
        reference = simulate_reference(captured.graph, cluster, {v: "cpu" for v in captured.graph}, optimizer=kind)
        assert reference.peak_memory.tolist() == [simulated]
        # A dense gradient of the table (and SGD's step temporaries of its size) made it 2.98x.
        assert measured <= simulated <= 1.1 * measured, (kind, measured, simulated)


class FrozenStem(nn.Module):
    """Two frozen layers, then two trained ones: a pipeline's first stage has nothing to train."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c, self.head = nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 16), nn.Linear(16, 5)
        self.a.requires_grad_(False)
        self.b.requires_grad_(False)

    def forward(self, x, y):
        h = torch.relu(self.b(torch.relu(self.a(x))))
        return nn.functional.cross_entropy(self.head(torch.relu(self.c(h))), y)


@pytest.mark.slow
def test_a_pipeline_x_ddp_whose_first_stage_is_frozen_trains_like_the_unsplit_model():
    """DDP refuses a module with no parameter that requires a gradient: the hybrid crashed on
    its first stage ("DistributedDataParallel is not needed ...")."""
    import copy

    from envs.runtime.pipeline.launcher import run_training
    from envs.sim.pipeline_layout import Pipeline
    from graphs.fx_tracer import fx_trace

    torch.manual_seed(0)
    model = FrozenStem()
    gm = fx_trace(model)
    names = [n.name for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    cut = names.index("c")
    pipe = Pipeline((tuple(names[:cut]), tuple(names[cut:])), ("cpu:0", "cpu:1"), 2, "gpipe", (("cpu:2", "cpu:3"),))
    g = torch.Generator().manual_seed(1)
    batch = {"x": torch.randn(8, 16, generator=g), "y": torch.randint(0, 5, (8,), generator=g)}
    reference = copy.deepcopy(model)
    reference(batch["x"], batch["y"]).backward()
    run = run_training(gm, batch, pipe, steps=1, optimizer=("sgd", {"lr": 0.1}), timeout_s=180)
    trained = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    assert set(run.grads) == set(trained) == {"c.weight", "c.bias", "head.weight", "head.bias"}
    for name, grad in trained.items():
        torch.testing.assert_close(run.grads[name], grad, rtol=1e-5, atol=1e-7, msg=name)
