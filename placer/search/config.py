"""The options of one search, bundled and checked once: :class:`SearchConfig`.

>>> SearchConfig(agent="flat", budget="20k").budget
Budget(seconds=None, placements=20000)
>>> try:
...     SearchConfig(num_envs=0)
... except SearchError as exc:
...     print(exc)
num_envs must be a positive integer, got 0
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from graphs.errors import PlacerError
from placer.options import OptionError, check_seed
from placer.search.agents.registry import DEFAULT_AGENT, UnknownAgentError, get_agent
from placer.search.budget import DEFAULT_BUDGET, Budget, parse_budget

if TYPE_CHECKING:
    from placer.search.agents.hierarchical.ppo import PPOConfig
    from placer.search.agents.reinforce import ReinforceConfig

#: Default plateau: stop after this many evaluations without improvement.
DEFAULT_PATIENCE = 60_000
#: Placements evaluated per batched simulator call.
DEFAULT_NUM_ENVS = 256


class SearchError(PlacerError, ValueError):
    """A search asked for with arguments that cannot work."""


def unreadable_policy(path: Path) -> str:
    """The refusal of a policy file torch (or SB3) cannot read, for ``--resume``."""
    return (f"cannot resume from {path}: it is not a policy file placer saved (torch cannot read it); "
            "expected the moves.pt or policy.zip of an earlier run, or remove it")


def check_policy_readable(path: Path) -> None:
    """Refuse a saved policy that cannot be read at all, before a run captures and profiles the
    model (minutes for a large one): the search loads it only once it starts. Whether it fits
    the problem (its agent, its group count) can only be told then.

    Raises:
        SearchError: the file cannot be opened or is no torch / SB3 (zip) file.
    """
    import pickle
    import zipfile

    import torch

    try:
        if path.suffix == ".zip":  # SB3's save format; set_parameters reads it
            with zipfile.ZipFile(path):
                pass
        else:
            torch.load(path, map_location="cpu", weights_only=True)
    except OSError as exc:
        raise SearchError(f"cannot resume from {path}: {exc.strerror or exc}; expected a readable policy file "
                          "of an earlier run, or remove it") from None
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError):
        raise SearchError(unreadable_policy(path)) from None


@dataclass(frozen=True)
class SearchConfig:
    """How to search (every field has the default users get).

    Attributes:
        agent: a name from :func:`placer.search.agents.registry.agent_names`.
        budget: ``"5m"``, ``"20k"``, ``"5m,100k"``, an int (placements), a float (seconds)
            or a :class:`~placer.search.budget.Budget`; stored parsed.
        seed: same seed and an evaluation budget give the same best placement.
        out_dir: where ``best_placement.json`` (and the policy) are written.
        num_groups: G of the hierarchical action (default
            :func:`envs.gym.config.default_num_groups`).
        num_envs: placements evaluated per batched simulator call.
        patience: stop after this many evaluations without improvement (None: never).
        imitation_steps: behaviour-cloning steps on the best initial placement (0: none).
        imitation_lr: Adam step size of the imitation warm start.
        progress: show a progress bar (stderr) with the best step time.
        tensorboard_log: directory for TensorBoard logs (PPO agents, if tensorboard imports).
        save_path: where the trained policy is saved (see :attr:`policy_path`).
        fingerprint, expand: written into / applied to the placement file (e.g. the model's
            fingerprint and ``grouping.expand`` to save op-level placements).
        metadata: more metadata of that file (``optimize``: the run's model arguments and real
            devices, so that ``placer apply`` of an interrupted run's best_placement.json
            rebuilds the model and finds the devices as it does for placement.json).
        ppo, reinforce: hyper-parameters of the PPO agents and of REINFORCE.
        threads: torch intra-op threads during the search (None: leave as is).
        env_kwargs: more :class:`envs.gym.placement_env.PlacementEnv` arguments (reward_mode,
            reference, invalid_penalty, node_ops, measurer, ...).
        resume: start from the policy saved at ``save_path`` by an earlier search, when there is one.
        local_search: interleave the improvement phase (:mod:`placer.search.local_search`).
            ``None``: on when the simulator scores placements (``simulated`` and ``hybrid``
            rewards), off for ``measured`` (a neighbourhood is hundreds of evaluations).
        local_search_share: the fraction of evaluations the improvement phase gets (None: the
            agent's own, :attr:`~placer.search.agents.registry.AgentEntry.local_search_share`).
        pretrained: start the agent from the policy shipped with the package (the ``moves``
            agent has one, trained by imitating local search across many graphs; the default:
            on the held-out graphs of ``benchmarks/bench_pretrained.py`` it reaches the best
            heuristic in fewer placements than fresh weights on 7 of 10, ``benchmarks/results/agent.md``),
            or from the policy file given here; False: from fresh weights. ``resume`` loads over it.

    Raises:
        SearchError: unknown agent, bad sizes or share; OptionError: a malformed budget.
    """

    agent: str = DEFAULT_AGENT
    budget: Budget = parse_budget(DEFAULT_BUDGET)  # also accepts what parse_budget reads; stored parsed
    seed: int = 0
    out_dir: Path | None = None
    num_groups: int | None = None
    num_envs: int = DEFAULT_NUM_ENVS
    patience: int | None = DEFAULT_PATIENCE
    imitation_steps: int = 50
    imitation_lr: float = 3e-3
    progress: bool = False
    tensorboard_log: str | None = None
    save_path: Path | None = None
    fingerprint: str = ""
    expand: Callable[[dict[str, str]], dict[str, str]] | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    ppo: PPOConfig | None = None
    reinforce: ReinforceConfig | None = None
    threads: int | None = 1
    env_kwargs: Mapping[str, Any] = field(default_factory=dict)
    resume: bool = False
    local_search: bool | None = None
    local_search_share: float | None = None
    pretrained: bool | Path = True

    def __post_init__(self) -> None:
        try:
            get_agent(self.agent)
        except UnknownAgentError as exc:
            raise SearchError(str(exc)) from None
        try:
            check_seed(self.seed, "seed")
        except OptionError as exc:
            raise SearchError(str(exc)) from None
        if isinstance(self.num_envs, bool) or int(self.num_envs) < 1:
            raise SearchError(f"num_envs must be a positive integer, got {self.num_envs!r}")
        if self.num_groups is not None and (isinstance(self.num_groups, bool) or int(self.num_groups) < 1):
            raise SearchError(f"num_groups must be a positive integer, got {self.num_groups!r}")
        if self.local_search_share is not None and (
                isinstance(self.local_search_share, bool) or not 0.0 < float(self.local_search_share) < 1.0):
            raise SearchError(f"local_search_share must be a fraction in (0, 1), got {self.local_search_share!r}")
        set_ = object.__setattr__  # frozen: normalise once, here
        set_(self, "budget", parse_budget(self.budget))
        set_(self, "num_envs", int(self.num_envs))
        set_(self, "env_kwargs", MappingProxyType(dict(self.env_kwargs)))
        if self.out_dir is not None:
            set_(self, "out_dir", Path(self.out_dir))
        if self.save_path is not None:
            set_(self, "save_path", Path(self.save_path))

    @property
    def policy_path(self) -> Path | None:
        """Where the trained policy goes: ``save_path``, else ``out_dir/<the agent's policy file>``."""
        if self.save_path is not None or self.out_dir is None:
            return self.save_path
        return Path(self.out_dir) / get_agent(self.agent).policy_file

    def replace(self, **changes: Any) -> SearchConfig:
        """A copy with ``changes`` (checked like a new config)."""
        return dataclasses.replace(self, **changes)
