"""graphs.saved_activations: act_bytes is what autograd saves, measured per fx node; the simulator uses it."""

from __future__ import annotations

import dataclasses

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from envs.hardware.loading import load_cluster
from envs.sim.memory_rules import BACKWARD_WORK_FACTOR, device_max, gradient_bytes
from envs.sim.problem_compile import compile_problem
from envs.sim.reference_simulator import simulate_reference
from envs.sim.simulator import simulate
from graphs.capture import capture
from graphs.model_file import default_optimizer
from graphs.pipeline import load_source, prepare
from graphs.saved_activations import SAVED_FROM, measure_saved_bytes, measure_step_peak

ONE_CPU = {"name": "1xcpu", "devices": [
    {"name": "cpu", "kind": "cpu", "memory": "24GiB", "peak_flops": "100G", "mem_bandwidth": "20GB/s"}]}


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(8, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = torch.relu(self.lin(x))
        v = r.view(-1)
        m = v * v  # saves v twice: one storage, r's
        return (m + 1).sum()


def _saved(fake: bool) -> dict[str, int]:
    captured = capture(Tiny(), (torch.randn(4, 8),))
    return measure_saved_bytes(captured.gm, captured.example_inputs, fake=fake)


@pytest.mark.parametrize("fake", [True, False])
def test_linear_saves_its_input_relu_its_output_add_and_views_nothing(fake):
    saved = _saved(fake)
    assert saved["x"] == 4 * 8 * 4  # the Linear's input (its weight is a parameter: param_bytes)
    assert saved["lin"] == 0
    assert saved["relu"] == 4 * 16 * 4  # relu's output, also what the view and the mul save: once
    assert saved["view"] == 0 and saved["mul"] == 0 and saved["add"] == 0
    assert saved["sum_1"] == 4  # the model's output, held by the training loop


def test_capture_states_act_bytes_on_every_node():
    captured = capture(Tiny(), (torch.randn(4, 8),))
    graph = captured.graph
    assert graph.graph[SAVED_FROM] == "fake"
    assert all("act_bytes" in graph.nodes[v] for v in graph)
    assert graph.nodes["relu"]["act_bytes"] == 256


@pytest.mark.parametrize("model", ["gpt2", "rnnlm", "resnet50"])
def test_fake_tensors_measure_what_real_tensors_do(model):
    spec = load_source(f"zoo:{model}")
    captured = capture(spec.model, spec.example_inputs, name=model)
    fake = measure_saved_bytes(captured.gm, captured.example_inputs, fake=True, loss_fn=spec.loss_fn)
    real = measure_saved_bytes(captured.gm, captured.example_inputs, fake=False, loss_fn=spec.loss_fn)
    assert fake == real
    assert sum(fake.values()) > 0


def test_group_graph_sums_its_members_act_bytes():
    prep = prepare("zoo:gpt2", profile=False)
    ops, groups = prep.captured.graph, prep.grouping.graph
    total = sum(ops.nodes[v]["act_bytes"] for v in ops)
    assert sum(groups.nodes[g]["act_bytes"] for g in groups) == total
    problem = compile_problem(ops, load_cluster(ONE_CPU), grouping=prep.grouping)
    assert problem.act_bytes.sum() == total


def _old_graph() -> nx.DiGraph:
    g = nx.DiGraph(name="old")
    g.add_node("x", op="placeholder", out_bytes=64, requires_grad=False)
    g.add_node("w", op="get_attr", out_bytes=400, param_bytes=400, requires_grad=True)
    g.add_node("m", op="call_function", out_bytes=32, requires_grad=True)
    g.add_node("out", op="output", out_bytes=32, requires_grad=True)
    g.add_edges_from([("x", "m", {"bytes": 64}), ("w", "m", {"bytes": 400}), ("m", "out", {"bytes": 32})])
    return g


def test_a_graph_written_before_act_bytes_keeps_the_output_estimate():
    g = _old_graph()
    problem = compile_problem(g, load_cluster(ONE_CPU))
    # only m keeps its output; the parameter is param_bytes, the input and the output node keep nothing
    assert problem.ops.act_bytes.tolist() == [0, 0, 32, 0]
    for v, nbytes in zip(g, (64, 0, 0, 0)):  # measured: m saved its input x
        g.nodes[v]["act_bytes"] = nbytes
    assert compile_problem(g, load_cluster(ONE_CPU)).ops.act_bytes.tolist() == [64, 0, 0, 0]


def test_one_device_peak_is_params_grads_state_saved_and_twice_the_largest_gradient():
    g = _old_graph()
    for v, nbytes in zip(g, (64, 0, 0, 0)):
        g.nodes[v]["act_bytes"] = nbytes
    cluster = load_cluster(ONE_CPU)
    problem = compile_problem(g, cluster, optimizer="adam")
    placement = {v: "cpu" for v in g}
    # params, grads, Adam's two moments; x kept by m; twice m's output gradient; or, at the
    # optimizer step (the activations freed), the batch x and the output the loop holds and
    # Adam's temporaries of the parameter, 4x its bytes
    expected = max(400 * (2 + 2) + 64 + BACKWARD_WORK_FACTOR * 32, 400 * (2 + 2) + 64 + 32 + 4 * 400)
    assert simulate(problem, placement).peak_memory.tolist() == [expected]
    assert simulate_reference(g, cluster, placement, optimizer="adam").peak_memory.tolist() == [expected]


@pytest.mark.parametrize("model,args", [("gpt2", {"batch_size": 16}), ("rnnlm", {"batch_size": 16}),
                                        ("resnet50", {})])
def test_simulated_peak_on_one_cpu_covers_what_the_allocator_holds(model, args):
    prep = prepare(f"zoo:{model}", model_args=args, profile=False)
    spec = load_source(f"zoo:{model}", args)  # a fresh instance: the captured one stays untrained
    measured = measure_step_peak(spec.model, spec.example_inputs, spec.loss_fn, spec.optimizer_fn)
    from graphs.profile.optimizer_timing import optimizer_kind

    problem = compile_problem(prep.captured.graph, load_cluster(ONE_CPU), grouping=prep.grouping,
                              optimizer=optimizer_kind(spec.optimizer_fn))
    peak = float(simulate(problem, np.zeros(problem.num_nodes, dtype=np.int64)).peak_memory[0])
    saved_real = sum(measure_saved_bytes(prep.captured.gm, prep.captured.example_inputs, fake=False,
                                         loss_fn=spec.loss_fn).values())
    assert peak >= saved_real + problem.param_bytes.sum()
    # Never below the allocator (the rule's purpose), and not wildly above it (the rule charges
    # a language model's logits-sized buffers ~4 times where at most ~3 are alive at once).
    assert measured <= peak <= 1.4 * measured


def test_step_peak_counts_a_large_intermediate():
    lin = nn.Linear(256, 256)
    x = torch.randn(512, 256)
    peak = measure_step_peak(lin, (x,), lambda out, x: out.square().mean(), default_optimizer)
    params = 256 * 257 * 4
    # params, their gradients, the input, the output and the squared output are all alive at once
    assert peak >= 2 * params + 3 * x.numel() * 4


def test_device_max_takes_the_largest_work_each_row_puts_on_each_device():
    rows = np.array([[0, 0, 1], [1, 1, 1], [2, 0, 0]])
    work = np.array([5.0, 7.0, 0.0])
    assert device_max(rows, work, 3).tolist() == [[7, 0, 0], [0, 7, 0], [7, 0, 5]]


def test_gradient_bytes_is_the_larger_of_output_and_shared_parameter_gradients():
    assert gradient_bytes({"op": "call_module", "out_bytes": 10, "param_bytes": 400, "requires_grad": True}) == 10
    assert gradient_bytes({"op": "call_module", "out_bytes": 10, "param_bytes": 400, "shared_param_bytes": 400,
                           "requires_grad": True}) == 400
    assert gradient_bytes({"op": "call_function", "out_bytes": 10, "requires_grad": True}) == 10
    assert gradient_bytes({"op": "get_attr", "out_bytes": 400, "param_bytes": 400, "requires_grad": False}) == 0
    assert gradient_bytes({"op": "placeholder", "out_bytes": 64, "requires_grad": True}) == 0


def test_a_tied_parameter_is_marked_shared_on_its_owner():
    class TiedHead(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(50, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.nn.functional.linear(self.emb(x), self.emb.weight)

    graph = capture(TiedHead(), (torch.randint(0, 50, (2, 3)),)).graph
    assert graph.nodes["emb"]["shared_param_bytes"] == 50 * 8 * 4
    assert sum(1 for v in graph if "shared_param_bytes" in graph.nodes[v]) == 1


@dataclasses.dataclass
class _HeadOutput:
    logits: torch.Tensor
    hidden: torch.Tensor


torch.export.register_dataclass(_HeadOutput)


class _Head(nn.Module):
    """Returns its logits in a dataclass, or in a dict (``as_dict``); a loss that saves nothing of them."""

    def __init__(self, as_dict: bool) -> None:
        super().__init__()
        self.body, self.out, self.as_dict = nn.Linear(8, 16), nn.Linear(16, 300), as_dict

    def forward(self, x: torch.Tensor, mode: str) -> _HeadOutput | dict[str, torch.Tensor]:
        h = self.body(x) * (2.0 if mode == "double" else 1.0)  # a string fx cannot follow: torch.export
        logits = self.out(h)
        return {"logits": logits, "hidden": h} if self.as_dict else _HeadOutput(logits, h)


def test_the_output_the_loop_holds_counts_alike_in_a_dataclass_and_in_a_dict():
    def logits_of(out):
        return out["logits"] if isinstance(out, dict) else out.logits

    saved = {}
    for as_dict in (False, True):
        captured = capture(_Head(as_dict), (torch.randn(4, 8), "double"))
        assert captured.method == "export"
        saved[as_dict] = measure_saved_bytes(captured.gm, captured.example_inputs,
                                             loss_fn=lambda out, x, mode: logits_of(out).mean())
    assert saved[False] == saved[True]
    assert sum(saved[False].values()) >= 4 * 300 * 4  # the logits, held by the loop until the step ends
