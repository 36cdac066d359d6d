"""The options of one ``placer.optimize`` run: :class:`OptimizeConfig`, the one place their defaults live.

Built from the user's arguments and checked before any long work starts (a bad budget,
an unknown reward mode, agent or baseline, a reward that cannot be computed for this kind
of model), then handed unchanged to every stage (:mod:`placer.optimizing.stages`).
Checks that need the devices (a reward that needs real devices on a simulated cluster)
run in the first stage, once the cluster is known.

>>> config = OptimizeConfig(model="zoo:rnnlm", cluster="4xK40", budget="20k")
>>> config.budget, config.agent, config.reward
(Budget(seconds=None, placements=20000), 'moves', None)
>>> try:
...     OptimizeConfig(model="zoo:rnnlm", reward="guess")
... except OptionError as exc:
...     print(exc)
unknown reward mode 'guess'; expected one of simulated, measured, hybrid
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from envs.gym.reward_modes import REWARD_MODES
from envs.hardware.cluster import Cluster
from envs.runtime.measurer import Measurer
from placer.options import OptionError, check_seed
from placer.out_dir import check_cache_dir
from placer.search.agents.registry import DEFAULT_AGENT, UnknownAgentError, agent_names, get_agent, grouper_agents
from placer.search.budget import DEFAULT_BUDGET, Budget, parse_budget

#: The simulated cluster used when no devices are named and fewer than two real ones exist.
DEFAULT_CLUSTER = "4xK40"
#: Baselines run by default: fast, constructive, and the ones users compare against.
DEFAULT_BASELINES: tuple[str, ...] = (
    "single", "expert", "round_robin", "balanced", "sequential", "pipeline_dp",
    "m_topo", "m_etf", "m_sct", "heft", "critical_path", "mincut",
)

ModelSource = torch.nn.Module | str | os.PathLike
ClusterSource = str | os.PathLike | Cluster | Mapping[str, Any]


@dataclass(frozen=True)
class OptimizeConfig:
    """Everything the user asked of one ``placer.optimize`` run (see :func:`placer.optimizing.run.optimize`).

    Attributes:
        model: an ``nn.Module`` (with ``example_inputs``), a model file path, or ``"zoo:<name>"``.
        example_inputs: the module's inputs (a tuple; one tensor means a 1-tuple; a dict, by
            ``forward``'s parameter names, as ``model(**batch)``).
        devices: real devices (``"cpu,cuda:0"``); or ``cluster``: a preset name, spec file
            or :class:`~envs.hardware.cluster.Cluster` (simulated). Neither: real devices
            when at least two exist, else :data:`DEFAULT_CLUSTER`.
        budget: search budget (:func:`~placer.search.budget.parse_budget`); stored parsed.
        reward: ``simulated``, ``measured``, ``hybrid`` or None (chosen from the devices).
        groups: how many groups the grouper of the hierarchical agents forms
            (:func:`~placer.search.agents.registry.grouper_agents`; None: from graph and devices).
            Refused with any other agent, which has no grouper and would ignore it.
        seed: makes the run reproducible.
        memory: per-device memory caps, ``"cuda:0=20GiB"`` or a dict.
        baselines: baseline names (a sequence, or one comma-separated string as ``--baselines``
            takes them) run first; their placements seed the search.
        agent: a registered search agent (:func:`~placer.search.agents.registry.agent_names`).
        out_dir: results and the best placement so far go there (None: nothing written).
        resume: start from the placement and policy an earlier run left in ``out_dir``.
        pretrained: start the agent from the policy shipped with the package (``moves``; the
            default); False (``--fresh``): from fresh weights.
        model_args: keyword arguments of a model file's ``get_model``/``get_example_inputs``.
        loss_fn, optimizer_fn: the training loss and optimizer of an ``nn.Module``.
        check: apply the winner and compare outputs and gradients with the original model.
        progress: show the search's progress bar (stderr).
        cache_dir: where op profiles are cached.
        verbose: 0 logs the run's summary line at DEBUG, 1 or more at INFO.
        measurer: measures op placements instead of the default worker processes (an
            :class:`envs.runtime.measurer.Measurer`: ``measure(placements) -> [MeasureResult]``,
            ``close()``), e.g. for devices this machine cannot start workers on.
        measure_timeout: seconds one placement's measurement may run (default 300); the
            search's time budget bounds every measurement during the search as well.
        leaf_modules: modules to keep as single ops (module paths such as ``"encoder.rnn"``,
            class names such as ``"Block"``, or ``nn.Module`` subclasses).
        batch_dim: the batch dimension of an ``nn.Module``'s inputs (None: 0), along which DDP
            replicas and pipeline micro-batches take their share; 1 for sequence-first inputs.
            A model file says it itself (``batch_dim = 1``): given here, it must agree.

    Raises:
        OptionError: a malformed budget, unknown reward mode, agent or baseline, groups < 1 or
            groups with an agent that has no grouper,
            or a reward that cannot be computed for this model and agent.
    """

    model: ModelSource
    example_inputs: Any = None
    devices: str | Sequence[str] | None = None
    cluster: ClusterSource | None = None
    budget: Budget = parse_budget(DEFAULT_BUDGET)  # also accepts what parse_budget reads; stored parsed
    reward: str | None = None
    groups: int | None = None
    seed: int = 0
    memory: str | Mapping[str, str | int] | None = None
    baselines: Sequence[str] = DEFAULT_BASELINES
    agent: str = DEFAULT_AGENT
    out_dir: str | os.PathLike | None = None
    resume: bool = False
    pretrained: bool = True
    model_args: Mapping[str, Any] | None = None
    loss_fn: Callable[..., torch.Tensor] | None = None
    optimizer_fn: Callable[..., torch.optim.Optimizer] | None = None
    check: bool = True
    progress: bool = True
    cache_dir: str | os.PathLike | None = None
    verbose: int = 1
    measurer: Measurer | None = None
    measure_timeout: float | None = None
    leaf_modules: Sequence[str | type[torch.nn.Module]] = ()
    batch_dim: int | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "budget", parse_budget(self.budget))
        set_(self, "leaf_modules", tuple(self.leaf_modules))
        if self.reward is not None and self.reward not in REWARD_MODES:
            raise OptionError(f"unknown reward mode {self.reward!r}; expected one of {', '.join(REWARD_MODES)}")
        self._check_types()
        if self.groups is not None and self.groups < 1:
            raise OptionError(f"--groups must be at least 1, got {self.groups}")
        check_seed(self.seed)
        check_cache_dir(self.cache_dir)
        try:
            entry = get_agent(self.agent)
        except UnknownAgentError as exc:
            raise OptionError(str(exc)) from None
        if self.groups is not None and not entry.hierarchical:
            # Only a grouper's agent reads it: with the default agent it was accepted and changed
            # nothing (the header line's "N groups" is the coarsening's, another count).
            users = " or ".join(f"--agent {name}" for name in grouper_agents())
            raise OptionError(f"--groups {self.groups} sets how many groups the grouper of {users} forms; agent "
                              f"{self.agent!r} has no grouper and would ignore it: add {users}, or leave --groups out")
        self._check_reward_source(entry.batched)
        # a string is the CLI's comma-separated list, as --baselines takes it
        baselines = (tuple(n.strip() for n in self.baselines.split(",") if n.strip())
                     if isinstance(self.baselines, str) else tuple(self.baselines))
        set_(self, "baselines", baselines)
        from placer.search.baselines import get_baseline

        for name in baselines:
            get_baseline(name)  # unknown names fail now, not after profiling
        if self.model_args is not None:
            set_(self, "model_args", MappingProxyType(dict(self.model_args)))

    def _check_types(self) -> None:
        """Refuse a value of the wrong kind given through the Python API (the CLI's parsers cannot
        produce one) in one line naming the option, before it fails deep inside a run:
        ``cluster=5`` stopped in ``os.fspath``, ``groups="4"`` in a comparison, and a negative
        ``measure_timeout`` was accepted (the CLI refuses it)."""

        def kind(value: object) -> str:
            return f"{type(value).__name__} {value!r}"

        if self.cluster is not None and not isinstance(self.cluster, (str, os.PathLike, Cluster, Mapping)):
            raise OptionError(f"cluster must be a preset name, a spec file path, a Cluster or a spec dict; got "
                              f"{kind(self.cluster)}")
        if self.devices is not None and not (isinstance(self.devices, str) or (
                isinstance(self.devices, Sequence) and all(isinstance(d, str) for d in self.devices))):
            raise OptionError(f"devices must be a string such as 'cpu,cuda:0' or a list of device strings; got "
                              f"{kind(self.devices)}")
        if self.groups is not None and (isinstance(self.groups, bool) or not isinstance(self.groups, int)):
            raise OptionError(f"groups must be an integer of at least 1; got {kind(self.groups)}")
        if self.measure_timeout is not None and (
                isinstance(self.measure_timeout, bool) or not isinstance(self.measure_timeout, (int, float))
                or not 0 < self.measure_timeout < float("inf")):
            raise OptionError(f"measure_timeout must be a number of seconds above 0; got {kind(self.measure_timeout)}")
        if self.batch_dim is not None and (isinstance(self.batch_dim, bool) or not isinstance(self.batch_dim, int)
                                           or self.batch_dim < 0):
            raise OptionError(f"batch_dim must be the inputs' batch dimension, an integer >= 0; got {kind(self.batch_dim)}")
        if not isinstance(self.agent, str):
            raise OptionError(f"agent must be an agent's name ({', '.join(agent_names())}); got {kind(self.agent)}")
        for name in ("resume", "pretrained", "check", "progress"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"{name} must be True or False; got {kind(getattr(self, name))}")

    @property
    def from_source(self) -> bool:
        """The model is a file or zoo name (worker processes can load it themselves)."""
        return isinstance(self.model, (str, os.PathLike))

    def _check_reward_source(self, agent_is_batched: bool) -> None:
        """Refuse reward/model/agent combinations that cannot work, before any long work."""
        if self.reward not in ("measured", "hybrid"):
            return
        if self.measurer is None and not self.from_source:
            raise OptionError(
                f"reward {self.reward!r} measures placements in worker processes that load the model themselves, "
                f"so it needs a model file or 'zoo:<name>', not an in-memory {type(self.model).__name__}; "
                "use reward 'simulated' or pass measurer="
            )
        if self.reward == "hybrid" and not agent_is_batched:
            others = ", ".join(n for n in agent_names() if get_agent(n).batched)
            raise OptionError(
                f"reward 'hybrid' recalibrates the one simulator an agent searches on, but the {self.agent} agent "
                f"runs several environments with a simulator each; use --reward measured or another --agent "
                f"({others})"
            )

    def replace(self, **changes: Any) -> OptimizeConfig:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)


def option_names() -> tuple[str, ...]:
    """The keyword options ``placer.optimize`` accepts (every field but the model and its inputs)."""
    return tuple(f.name for f in dataclasses.fields(OptimizeConfig)
                 if f.name not in ("model", "example_inputs"))


def make_config(model: ModelSource, example_inputs: Any = None, **options: Any) -> OptimizeConfig:
    """An :class:`OptimizeConfig` from ``placer.optimize``'s arguments.

    Raises:
        OptionError: an option ``placer.optimize`` does not have (the message lists them),
            or any check of :class:`OptimizeConfig`.
    """
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise OptionError(f"unknown option(s) {', '.join(unknown)}; placer.optimize takes {', '.join(option_names())}")
    return OptimizeConfig(model=model, example_inputs=example_inputs, **options)
