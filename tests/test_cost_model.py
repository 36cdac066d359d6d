"""Cost model: profiled times, roofline, calibration, and what compile_problem builds from them."""

from __future__ import annotations

import networkx as nx
import numpy as np
import pytest
import torch
from torch import nn

from envs.hardware.cluster import Cluster, Device
from envs.hardware.loading import load_cluster
from envs.sim.cost_model import DEFAULT_ROOFLINE, CostModel, Roofline, calibrate, profiled_times, roofline_times
from envs.sim.problem import PlacementError
from envs.sim.problem_compile import compile_problem, topological_order
from graphs.errors import GraphError
from tests.helpers.graphs import layered_graph

K40 = Device("g", "K40", 12 * 2**30, 4.29e12, 288e9)


def test_profiled_time_wins_where_the_kind_was_profiled():
    attrs = {"op": "call_module", "flops": 10**9, "bytes_moved": 10**6,
             "fwd_time": {"cpu": 1e-3}, "bwd_time": {"cpu": 3e-3}}
    model = CostModel()
    assert model.node_cost(attrs, Device("c", "cpu", 1, 1e12, 1e11)) == (1e-3, 3e-3)
    fwd, bwd = model.node_cost(attrs, K40)  # K40 not profiled: roofline
    eff = DEFAULT_ROOFLINE["K40"]
    compute = 1e9 / (4.29e12 * eff.efficiency)
    assert fwd == pytest.approx(compute + eff.launch_overhead_s)
    assert bwd == pytest.approx(2 * compute + eff.launch_overhead_s)


def test_memory_bound_ops_and_zero_cost_nodes():
    fwd, _ = roofline_times({"op": "call_function", "flops": 0, "bytes_moved": 288 * 10**6}, K40, Roofline(1.0, 0.0))
    assert fwd == pytest.approx(1e-3)
    for op in ("placeholder", "output", "get_attr"):
        assert roofline_times({"op": op, "flops": 10**9}, K40, Roofline(0.5, 1e-5)) == (0.0, 0.0)
    assert roofline_times({"op": "call_method", "flops": 0, "bytes_moved": 0}, K40, Roofline(0.5, 1e-5)) == (0.0, 0.0)
    # A group of 3 ops pays 3 launches.
    fwd3, _ = roofline_times({"op": "group", "bytes_moved": 1, "members": ["a", "b", "c"]}, K40, Roofline(0.5, 1e-5))
    assert fwd3 == pytest.approx(3e-5, rel=1e-3)


def test_time_only_profiles_split_and_no_grad_has_no_backward():
    assert profiled_times({"time": {"cpu": 3e-3}}, "cpu") == pytest.approx((1e-3, 2e-3))
    assert profiled_times({"time": {"cpu": 3e-3}}, "cuda") is None
    cpu = Device("c", "cpu", 1, 1e12, 1e11)
    assert CostModel().node_cost({"fwd_time": {"cpu": 1.0}, "bwd_time": {"cpu": 2.0}, "requires_grad": False}, cpu) == (1.0, 0.0)


def test_calibration_recovers_the_constants_it_was_generated_with():
    cpu = Device("c", "cpu", 2**34, 1e11, 2e10)
    rng = np.random.default_rng(0)
    true = Roofline(0.25, 4e-6)
    g = nx.DiGraph()
    for i in range(60):
        # log-uniform sizes, like real graphs: many small ops, a few big ones
        attrs = {"op": "call_function", "flops": int(10 ** rng.uniform(3, 9)), "bytes_moved": int(10 ** rng.uniform(3, 8))}
        fwd, _ = roofline_times(attrs, cpu, true)
        g.add_node(i, **attrs, fwd_time={"cpu": fwd * float(rng.uniform(0.97, 1.03))})
    fit = calibrate(g, cpu)
    assert fit is not None
    assert fit.efficiency == pytest.approx(0.25, rel=0.1)
    assert fit.launch_overhead_s == pytest.approx(4e-6, abs=3e-6)
    assert calibrate(nx.DiGraph(), cpu) is None
    # The default cost model of a graph with CPU profiles uses the fit.
    model = CostModel.for_graph(g, Cluster("c", (cpu,)))
    assert model.roofline["cpu"] == fit


def test_compile_problem_arrays():
    g = layered_graph(30, seed=2, profiled_kinds=("cpu",))
    problem = compile_problem(g, load_cluster("4xK40"), optimizer="adam")
    assert problem.node_names == tuple(topological_order(g))
    assert problem.fwd_time.shape == (30, 5) and problem.optimizer_state_factor == 2.0
    assert np.all(problem.edge_src < problem.edge_dst)
    assert problem.latency[0, 0] == 0 and np.isinf(problem.bandwidth[1, 1])
    assert problem.bandwidth[0, 1] == 12e9 and problem.bandwidth[1, 2] == 10e9
    # CPU column comes from the profiles, K40 columns from the roofline.
    i = problem.node_index("n7")
    assert problem.fwd_time[i, 0] == g.nodes["n7"]["fwd_time"]["cpu"]
    assert problem.fwd_time[i, 1] != problem.fwd_time[i, 0]
    # CSR predecessors match the edges.
    for v in range(problem.num_nodes):
        preds = problem.edge_src[problem.pred_edge[problem.pred_ptr[v]:problem.pred_ptr[v + 1]]]
        assert sorted(preds.tolist()) == sorted(problem.edge_src[problem.edge_dst == v].tolist())
    assert problem.simulated is not False


def test_compile_problem_costs_the_optimizer_the_graph_was_profiled_with_unless_told_otherwise():
    g = layered_graph(12, seed=4)
    for v in g.nodes:
        g.nodes[v]["param_bytes"] = 4_000_000
        g.nodes[v]["param_tensors"] = 2
    sgd = compile_problem(g, "4xK40")
    g.graph["optimizer"] = "adam"
    adam = compile_problem(g, "4xK40")
    assert sgd.optimizer_state_factor == 0.0 and adam.optimizer_state_factor == 2.0
    # Adam's update reads and writes two state tensors more: a slower (roofline) backward.
    assert np.all(adam.bwd_time[adam.requires_grad] > sgd.bwd_time[sgd.requires_grad])
    told = compile_problem(g, "4xK40", optimizer="sgd")
    assert told.optimizer_state_factor == 0.0 and np.array_equal(told.bwd_time, sgd.bwd_time)
    # An optimizer of unknown state size, as profiling names it, is costed like Adam.
    g.graph["optimizer"] = "adadelta"
    assert compile_problem(g, "4xK40").optimizer_state_factor == 2.0


def test_compile_problem_errors():
    g = layered_graph(3)
    with pytest.raises(PlacementError, match="unknown optimizer 'lbfgs'"):
        compile_problem(g, "4xK40", optimizer="lbfgs")
    cyclic = nx.DiGraph([("a", "b"), ("b", "a")])
    with pytest.raises(GraphError, match="cycle"):
        compile_problem(cyclic, "4xK40")
    with pytest.raises(GraphError, match="non-empty"):
        compile_problem(nx.DiGraph(), "4xK40")


def test_backward_includes_the_profiled_optimizer_update_where_that_kind_was_profiled():
    cpu = Device("c", "cpu", 1, 1e12, 1e11)
    attrs = {"op": "call_module", "param_bytes": 4000, "fwd_time": {"cpu": 1e-3}, "bwd_time": {"cpu": 3e-3},
             "opt_time": {"cpu": 5e-4}}
    assert CostModel().node_cost(attrs, cpu) == pytest.approx((1e-3, 3.5e-3))
    # A profiled kind without the node's optimizer time (an update that could not be timed,
    # a graph profiled before optimizer times existed) gets the roofline estimate instead.
    del attrs["opt_time"]
    roof = Roofline(0.5, 2e-6)
    model = CostModel(roofline={"cpu": roof}, optimizer="sgd")
    assert model.node_cost(attrs, cpu)[1] == pytest.approx(3e-3 + 4000 * 3 / 1e11 + 2e-6)


def test_roofline_optimizer_update_follows_parameter_bytes_and_optimizer_state():
    attrs = {"op": "call_module", "flops": 10**6, "bytes_moved": 10**4, "param_bytes": 288 * 10**6, "param_tensors": 2}
    roof = DEFAULT_ROOFLINE["K40"]
    sgd = CostModel(optimizer="sgd").opt_cost(attrs, K40)
    adam = CostModel(optimizer="adam").opt_cost(attrs, K40)
    # SGD reads parameter and gradient and writes the parameter (3 passes over 288 MB at
    # 288 GB/s); Adam also reads and writes two moments (7 passes); one kernel per tensor touched.
    assert sgd == pytest.approx(3e-3 + 2 * roof.launch_overhead_s)
    assert adam == pytest.approx(7e-3 + 2 * 3 * roof.launch_overhead_s)
    assert CostModel(optimizer="adam").opt_cost({"op": "call_function", "param_bytes": 0}, K40) == 0.0
    assert CostModel(optimizer="adam").node_cost(dict(attrs, requires_grad=False), K40)[1] == 0.0  # frozen: no update
    assert CostModel(optimizer="something_new").opt_cost(attrs, K40) == pytest.approx(adam)  # unknown: Adam-sized


def test_for_graph_estimates_the_optimizer_the_graph_was_profiled_with_and_one_cpu_costs_the_sum():
    g = nx.DiGraph(optimizer="adam")
    g.add_node("w", op="call_module", flops=10**8, bytes_moved=10**6, param_bytes=10**6, requires_grad=True)
    g.add_node("y", op="call_function", flops=10**6, bytes_moved=10**5, param_bytes=0, requires_grad=True)
    g.add_edge("w", "y", bytes=1000)
    cluster = load_cluster("4xK40")
    model = CostModel.for_graph(g, cluster)
    assert model.optimizer == "adam"
    problem = compile_problem(g, cluster, optimizer="adam")
    from envs.sim.simulator import simulate

    for dev in cluster.devices:  # the host/device split keeps the totals
        for n in g.nodes:
            assert sum(model.op_cost(g.nodes[n], dev)) == pytest.approx(sum(model.node_cost(g.nodes[n], dev)), rel=1e-12)
    cpu = cluster.devices[0]
    assert cpu.kind == "cpu"
    res = simulate(problem, {"w": cpu.name, "y": cpu.name})
    host = model.host
    expected = sum(sum(model.node_cost(g.nodes[n], cpu)) for n in g.nodes) + host.loss_s + host.backward_call_s + host.step_s
    assert res.step_time == pytest.approx(expected, rel=1e-12)
    gpu = cluster.devices[-1]
    assert model.node_cost(g.nodes["w"], gpu)[1] > roofline_times(g.nodes["w"], gpu, model.roofline_for(gpu.kind))[1]


def test_a_gpu_op_pays_its_launch_on_the_host_and_its_work_on_the_device():
    roof = DEFAULT_ROOFLINE["K40"]
    attrs = {"op": "call_module", "flops": 10**9, "bytes_moved": 10**6, "param_bytes": 288 * 10**6,
             "param_tensors": 2, "requires_grad": True}
    h_f, d_f, h_b, d_b, h_o, d_o = CostModel(optimizer="adam").op_cost(attrs, K40)
    compute = 1e9 / (4.29e12 * roof.efficiency)
    assert (h_f, h_b) == (roof.launch_overhead_s, roof.launch_overhead_s)
    assert d_f == pytest.approx(compute) and d_b == pytest.approx(2 * compute)
    # The update: one launch per tensor touched on the host, 7 passes over the parameters on the device.
    assert h_o == pytest.approx(2 * 3 * roof.launch_overhead_s) and d_o == pytest.approx(7e-3)
    # A profiled CUDA time: the launch comes off it (or the profiled host time where recorded).
    prof = dict(attrs, fwd_time={"cuda": 1e-3}, bwd_time={"cuda": 2e-3}, opt_time={"cuda": 1e-4})
    cuda = Device("c", "cuda", 2**34, 1e13, 1e12)
    h_f, d_f, h_b, d_b, h_o, d_o = CostModel().op_cost(prof, cuda)
    launch = DEFAULT_ROOFLINE["cuda"].launch_overhead_s
    assert (h_f, d_f) == pytest.approx((launch, 1e-3 - launch)) and h_b + d_b == pytest.approx(2e-3)
    assert h_o + d_o == pytest.approx(1e-4)
    timed = dict(prof, host_time={"cuda": 3e-4})
    assert CostModel().op_cost(timed, cuda)[:2] == pytest.approx((3e-4, 7e-4))
    # On a CPU the whole op runs on the host thread.
    cpu = Device("p", "cpu", 2**34, 1e11, 2e10)
    prof_cpu = dict(attrs, fwd_time={"cpu": 1e-3}, bwd_time={"cpu": 2e-3}, opt_time={"cpu": 5e-4})
    assert CostModel().op_cost(prof_cpu, cpu) == (1e-3, 0.0, 2e-3, 0.0, 5e-4, 0.0)
    frozen = dict(prof_cpu, requires_grad=False)
    assert CostModel().op_cost(frozen, cpu) == (1e-3, 0.0, 0.0, 0.0, 0.0, 0.0)


@pytest.mark.parametrize(("kind", "rate"), [("K40", 1.43 / 4.29), ("V100", 7.8 / 15.7), ("H100", 34.0 / 67.0)])
def test_a_double_precision_matmul_runs_at_the_devices_fp64_rate_and_a_memory_bound_op_does_not_change(kind, rate):
    """The roofline costed every FLOP at the fp32 peak: a float64 model's matmuls on a K40 ran 3x
    too fast in the simulator."""
    device = Device("g", kind, 16 * 2**30, 4.29e12 if kind == "K40" else 15.7e12, 900e9)
    roofline = Roofline(0.7, 5e-6)
    matmul = {"op": "call_module", "flops": 2e12, "bytes_moved": 1e6}
    single = roofline_times({**matmul, "dtype": "torch.float32"}, device, roofline)[0] - 5e-6
    double = roofline_times({**matmul, "dtype": "torch.float64"}, device, roofline)[0] - 5e-6
    assert double == pytest.approx(single / rate)
    copy = {"op": "call_function", "flops": 1e3, "bytes_moved": 8e9}
    assert roofline_times({**copy, "dtype": "torch.float64"}, device, roofline) == \
        roofline_times({**copy, "dtype": "torch.float32"}, device, roofline)


@pytest.mark.parametrize(("kind", "peak", "rate"), [("A100", 19.5e12, 156.0 / 19.5), ("H100", 67e12, 494.7 / 67.0),
                                                    ("V100", 15.7e12, 1.0)])
def test_an_fp32_convolution_runs_at_the_tf32_rate_where_pytorch_uses_it_and_a_matmul_does_not(kind, peak, rate):
    """PyTorch runs fp32 convolutions on TF32 tensor cores by default on Ampere and later
    (cudnn.conv.fp32_precision "tf32"), fp32 matmuls in IEEE fp32 ("none")."""
    assert torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32  # the defaults assumed
    device = Device("g", kind, 16 * 2**30, peak, 900e9)
    roofline = Roofline(0.7, 5e-6)
    work = {"op": "call_module", "flops": 4e12, "bytes_moved": 1e6, "dtype": "torch.float32"}
    matmul = roofline_times(work, device, roofline)[0] - 5e-6
    conv = roofline_times({**work, "convolution": True}, device, roofline)[0] - 5e-6
    assert conv == pytest.approx(matmul / rate)
    half_conv = roofline_times({**work, "convolution": True, "dtype": "torch.bfloat16"}, device, roofline)[0] - 5e-6
    assert half_conv == pytest.approx(roofline_times({**work, "dtype": "torch.bfloat16"}, device, roofline)[0] - 5e-6)


def test_the_placement_graph_marks_convolutions_modules_and_functions():
    from graphs.capture import capture

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)
            self.w = nn.Parameter(torch.randn(4, 4, 1, 1))
            self.fc = nn.Linear(4, 2)

        def forward(self, x):
            h = torch.nn.functional.conv2d(self.conv(x), self.w)
            return self.fc(h.mean((2, 3)))

    graph = capture(Net(), (torch.randn(2, 3, 8, 8),), name="net").graph
    assert sorted(n for n, c in graph.nodes(data="convolution") if c) == ["conv", "conv2d"]


@pytest.mark.parametrize(("kind", "peak", "dtype", "rate"), [
    ("V100", 15.7e12, "torch.float16", 125.0 / 15.7), ("V100", 15.7e12, "torch.bfloat16", 1.0),
    ("A100", 19.5e12, "torch.bfloat16", 312.0 / 19.5), ("H100", 67e12, "torch.float16", 989.4 / 67.0),
    ("K40", 4.29e12, "torch.float16", 1.0)])
def test_a_half_precision_matmul_runs_at_the_tensor_core_rate_where_the_device_has_one(kind, peak, dtype, rate):
    """A bfloat16 autocast MLP's matmuls were costed at the fp32 rate on every GPU: 16x too slow
    on an A100. Volta's tensor cores take float16 only; a K40 has none."""
    device = Device("g", kind, 16 * 2**30, peak, 900e9)
    roofline = Roofline(0.7, 5e-6)
    matmul = {"op": "call_function", "flops": 4e12, "bytes_moved": 1e6}
    single = roofline_times({**matmul, "dtype": "torch.float32"}, device, roofline)[0] - 5e-6
    half = roofline_times({**matmul, "dtype": dtype}, device, roofline)[0] - 5e-6
    assert half == pytest.approx(single / rate)
    copy = {"op": "call_function", "flops": 1e3, "bytes_moved": 8e9}
    assert roofline_times({**copy, "dtype": dtype}, device, roofline) == \
        roofline_times({**copy, "dtype": "torch.float32"}, device, roofline)
