"""Gymnasium registration: ``gymnasium.make("placer/Placement-v0", ...)`` and
``"placer/SequentialPlacement-v0"``.

``import envs`` registers both ids with *string* entry points, so registering imports
neither torch nor the simulator; the factories here import what they need when an
environment is actually built. An environment is built from exactly one of:

* ``problem=`` a compiled :class:`envs.sim.problem.PlacementProblem`;
* ``graph=`` a networkx placement graph (op or group graph), or the path of a saved one
  (``.json``/``.graphml``, :func:`graphs.graph_io.load_graph`), plus ``cluster=``;
* ``model=`` a model file path or ``"zoo:<name>"`` (captured, profiled and grouped by
  :func:`graphs.pipeline.prepare`; the *group* graph is placed), plus ``cluster=``;

with ``cluster=`` a preset name (``envs.hardware.loading.list_presets()``), a spec file path, a
spec mapping or a :class:`envs.hardware.cluster.Cluster`. Every other keyword goes to the
environment class. Example::

    import gymnasium as gym, envs
    env = gym.make("placer/Placement-v0", model="zoo:nmt", cluster="4xK40", num_groups=64)
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import gymnasium as gym

from envs.gym.config import EnvConfigError
from graphs.errors import PlacerError

PLACEMENT_ENV_ID = "placer/Placement-v0"
SEQUENTIAL_ENV_ID = "placer/SequentialPlacement-v0"


def register_envs() -> None:
    """Register the placer environments with gymnasium (idempotent)."""
    for env_id, entry_point in (
        (PLACEMENT_ENV_ID, "envs.gym.registration:make_placement_env"),
        (SEQUENTIAL_ENV_ID, "envs.gym.registration:make_sequential_env"),
    ):
        if env_id not in gym.registry:
            gym.register(id=env_id, entry_point=entry_point)


def build_problem(problem: Any = None, graph: Any = None, cluster: Any = None, model: Any = None,
                  model_args: Mapping[str, Any] | None = None, optimizer: str | None = None, profile: bool = True,
                  cache_dir: str | os.PathLike | None = None):
    """The problem (and each node's fx op kind, when a graph is known) from one source.

    ``optimizer`` (whose state the devices' memory holds): None is the model's own optimizer
    (``model=``) or the one a graph was profiled with (``graph=``), else plain SGD, as
    :func:`envs.sim.problem_compile.compile_problem`.

    Returns:
        ``(problem, node_ops)``; ``node_ops`` is None when built from a problem.

    Raises:
        EnvConfigError: no source or several, a missing or unknown cluster, an unknown model
            or graph file, or anything else that stops the problem from being built.
    """
    built = _build(problem, graph, cluster, model, model_args, optimizer, profile, cache_dir)
    return built.problem, built.node_ops


@dataclass
class _Built:
    problem: Any
    node_ops: list | None = None
    cluster: Any = None
    grouping: Any = None  # graphs.grouping.Grouping when built from a model


def _build(problem: Any, graph: Any, cluster: Any, model: Any, model_args: Mapping[str, Any] | None,
           optimizer: str | None, profile: bool, cache_dir: str | os.PathLike | None) -> _Built:
    from envs.sim.problem import PlacementProblem

    given = [name for name, v in (("problem", problem), ("graph", graph), ("model", model)) if v is not None]
    if len(given) != 1:
        raise EnvConfigError(
            "build the environment from exactly one of problem= (a PlacementProblem), graph= (a placement "
            f"graph or its file) with cluster=, or model= (a model file or 'zoo:<name>') with cluster=; got "
            f"{', '.join(given) if given else 'none'}"
        )
    if problem is not None:
        if cluster is not None or model_args:
            raise EnvConfigError("cluster= and model_args= do not apply to a compiled problem= (it has its devices)")
        if not isinstance(problem, PlacementProblem):
            raise EnvConfigError(f"problem= must be an envs.sim.problem.PlacementProblem, got {type(problem).__name__}")
        return _Built(problem)
    if cluster is None:
        raise EnvConfigError(_cluster_hint("a cluster is needed to place a graph or model: pass cluster="))
    # The cluster first: a typo there should not cost a model capture and profile.
    cluster = _load_cluster(cluster)
    grouping = op_graph = None
    if model is not None:
        prepared = _prepare(model, model_args, profile, cache_dir)
        grouping, op_graph = prepared.grouping, prepared.captured.graph
        graph = grouping.graph
        if optimizer is None:  # the model's own, as optimize, show and the benchmark cost it
            from envs.sim.optimizer_state import optimizer_state_kind

            optimizer = optimizer_state_kind(prepared.spec.optimizer_fn)
    elif model_args:
        raise EnvConfigError("model_args= applies to model= only")
    graph = _load_graph(graph)
    from envs.gym.features import graph_ops
    from envs.sim.problem_compile import compile_problem

    try:
        # A model: its op graph executes, its groups are the action space (one simulation
        # everywhere, issue 15). A graph alone: every node is its own group.
        compiled = (compile_problem(op_graph, cluster, optimizer=optimizer, grouping=grouping) if grouping is not None
                    else compile_problem(graph, cluster, optimizer=optimizer))
    except PlacerError as exc:
        raise EnvConfigError(f"cannot build the placement problem: {exc}") from exc
    return _Built(compiled, graph_ops(graph, compiled.node_names, op_graph), cluster, grouping)


def _cluster_hint(message: str) -> str:
    try:
        from envs.hardware.loading import list_presets

        presets = ", ".join(list_presets())
    except Exception:  # noqa: BLE001 - the hint is a courtesy; the message stands without it
        presets = "`placer presets` lists them"
    return f"{message} (a preset: {presets}; a .yaml/.json spec file; or 'real')"


def _load_cluster(cluster: Any):
    from envs.hardware.loading import load_cluster

    try:
        return load_cluster(cluster)
    except PlacerError as exc:
        raise EnvConfigError(f"bad cluster {cluster!r}: {exc}") from exc
    except TypeError as exc:
        raise EnvConfigError(_cluster_hint(f"cluster= must be a preset name, spec path or Cluster, "
                                           f"got {type(cluster).__name__}")) from exc


def _load_graph(graph: Any):
    import networkx as nx

    if isinstance(graph, nx.DiGraph):
        return graph
    if isinstance(graph, (str, os.PathLike)):
        from graphs.graph_io import load_graph

        if not os.path.exists(graph):
            raise EnvConfigError(f"graph file {os.fspath(graph)!r} does not exist")
        try:
            return load_graph(graph)
        except PlacerError as exc:
            raise EnvConfigError(f"cannot load graph file {os.fspath(graph)!r}: {exc}") from exc
    raise EnvConfigError(f"graph= must be a networkx.DiGraph placement graph or the path of a saved one, "
                         f"got {type(graph).__name__}")


def _prepare(model: Any, model_args: Mapping[str, Any] | None, profile: bool,
             cache_dir: str | os.PathLike | None):
    from graphs.pipeline import prepare

    try:
        prepared = prepare(model, model_args=model_args, profile=profile, cache_dir=cache_dir)
    except PlacerError as exc:
        raise EnvConfigError(f"cannot build the environment from model {model!r}: {exc}") from exc
    return prepared


def _wants_own_measurer(model: Any, env_kwargs: Mapping[str, Any]) -> bool:
    """Whether the env is to measure with a measurer made here (``measurer="auto"``, or
    measured/hybrid mode with ``model=`` and no measurer)."""
    wants = env_kwargs.get("reward_mode", "simulated") in ("measured", "hybrid")
    return env_kwargs.get("measurer") == "auto" or (wants and env_kwargs.get("measurer") is None and model is not None)


def _check_measurable(cluster: Any) -> None:
    """Refuse, before the model is captured, a cluster whose devices do not all map onto a torch
    device (a simulated spec such as 4xK40: gpu0 has no ``real_device``), as optimize refuses a
    measured reward on a simulated cluster; the measurer would only find out at the reference."""
    import torch

    unmapped = []
    for d in cluster.devices:
        try:
            torch.device(d.real_device or d.name)
        except (RuntimeError, TypeError):
            unmapped.append(d.name)
    if unmapped:
        raise EnvConfigError(
            f"a measured or hybrid reward runs the model on real devices, but cluster {cluster.name!r} is a spec "
            f"whose device(s) {', '.join(unmapped)} name no real_device to run on; use cluster='real' (this "
            "machine's devices), a spec whose devices each give real_device ('cpu', 'cuda:0'), "
            "reward_mode='simulated', or pass measurer= your own"
        )


def _env_kwargs(built: _Built, model: Any, model_args: Mapping[str, Any] | None,
                env_kwargs: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """Complete the env's keyword arguments: op kinds, and a measurer when one is needed and
    can be made (``model=`` given, measured/hybrid mode, ``measurer`` None or "auto").

    Returns the kwargs and the measurer made here (the env owns it and closes it), or None.
    """
    kwargs = dict(env_kwargs)
    if built.node_ops is not None:
        kwargs.setdefault("node_ops", built.node_ops)
    if _wants_own_measurer(model, kwargs):
        if model is None or built.grouping is None:
            raise EnvConfigError("measurer='auto' needs model= (a model file or 'zoo:<name>') to run; "
                                 "pass measurer= an envs.runtime.measurer.Measurer instead")
        from envs.runtime.measure import SingleProcessMeasurer

        # The env places groups; the measurer expands them to ops and maps cluster devices to real ones.
        kwargs["measurer"] = SingleProcessMeasurer(model, model_args=model_args, devices=built.cluster,
                                                   expand=built.grouping.expand)
        return kwargs, kwargs["measurer"]
    return kwargs, None


def _make(env_class: Any, problem: Any, graph: Any, cluster: Any, model: Any, model_args: Mapping[str, Any] | None,
          optimizer: str | None, profile: bool, cache_dir: str | os.PathLike | None, env_kwargs: dict[str, Any]):
    if model is not None and cluster is not None and _wants_own_measurer(model, env_kwargs):
        _check_measurable(_load_cluster(cluster))  # seconds to minutes of capture saved on a refusal
    built = _build(problem, graph, cluster, model, model_args, optimizer, profile, cache_dir)
    kwargs, owned = _env_kwargs(built, model, model_args, env_kwargs)
    try:
        env = env_class(built.problem, **kwargs)
    except BaseException:
        if owned is not None:
            owned.close()
        raise
    env.owned_measurer = owned
    return env


def make_placement_env(problem: Any = None, graph: Any = None, cluster: Any = None, model: Any = None,
                       model_args: Mapping[str, Any] | None = None, optimizer: str | None = None, profile: bool = True,
                       cache_dir: str | os.PathLike | None = None, **env_kwargs: Any):
    """A :class:`envs.gym.placement_env.PlacementEnv` from a problem, graph + cluster, or model + cluster.

    With ``model=`` and ``reward_mode`` "measured"/"hybrid", ``measurer`` defaults to an
    :class:`envs.runtime.measure.SingleProcessMeasurer` of that model (closed with the env).
    """
    from envs.gym.placement_env import PlacementEnv

    return _make(PlacementEnv, problem, graph, cluster, model, model_args, optimizer, profile, cache_dir, env_kwargs)


def make_sequential_env(problem: Any = None, graph: Any = None, cluster: Any = None, model: Any = None,
                        model_args: Mapping[str, Any] | None = None, optimizer: str | None = None, profile: bool = True,
                        cache_dir: str | os.PathLike | None = None, **env_kwargs: Any):
    """A :class:`envs.gym.sequential_env.SequentialPlacementEnv` from the same sources as :func:`make_placement_env`."""
    from envs.gym.sequential_env import SequentialPlacementEnv

    return _make(SequentialPlacementEnv, problem, graph, cluster, model, model_args, optimizer, profile, cache_dir,
                 env_kwargs)


def make_vec_env(n_envs: int = 8, problem: Any = None, graph: Any = None, cluster: Any = None, model: Any = None,
                 model_args: Mapping[str, Any] | None = None, optimizer: str | None = None, profile: bool = True,
                 cache_dir: str | os.PathLike | None = None, **env_kwargs: Any):
    """A :class:`envs.gym.vector_env.BatchedPlacementVecEnv` of ``n_envs`` from the same sources."""
    from envs.gym.vector_env import BatchedPlacementVecEnv

    env = make_placement_env(problem, graph, cluster, model, model_args, optimizer, profile, cache_dir, **env_kwargs)
    return BatchedPlacementVecEnv(n_envs=n_envs, env=env)
