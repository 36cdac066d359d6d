"""The search agents by name: one interface (:class:`~placer.search.agents.base.SearchAgent`) and one registry.

:func:`placer.search.search.search` asks the registry for an agent by name and drives it
the same way whatever it is: build it on the batched environment, resume its saved
weights or imitate the best heuristic placement, let it learn until the tracker stops
it, save it. Adding an agent is one :func:`register_agent` call; the CLI's ``--agent``
choices and every "unknown agent" message read :func:`agent_names`.

This module stays light (no SB3, no torch at import) so that ``placer --help`` can list
the agents: each factory imports its agent's module when it is called.

>>> agent_names()
('moves', 'hierarchical', 'reinforce', 'flat', 'sequential')
>>> try:
...     get_agent("telepathy")
... except UnknownAgentError as exc:
...     print(exc)
unknown agent 'telepathy'; expected one of moves, hierarchical, reinforce, flat, sequential
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graphs.errors import PlacerError
from placer.search.agents.base import AgentContext, SearchAgent


class UnknownAgentError(PlacerError, ValueError):
    """An agent name the registry does not hold."""


@dataclass(frozen=True)
class AgentEntry:
    """One registered agent.

    Attributes:
        name: what users type (``--agent NAME``).
        summary: one line for ``--help`` and the docs.
        build: ``AgentContext -> SearchAgent``.
        hierarchical: the batched environment's action is the hierarchical one (a grouper
            over groups) rather than a device per node.
        batched: the agent trains on the batched environment; False for an agent with
            environments of its own (the batched one then has one copy and scores the seeds).
        imitates: it can be warm-started by imitating the best heuristic placement.
        policy_file: the file name its weights are saved under in ``out_dir``.
        local_search_share: the share of evaluations the interleaved local search gets when
            the search config leaves it to the agent.
    """

    name: str
    summary: str
    build: Callable[[AgentContext], SearchAgent]
    hierarchical: bool = True
    batched: bool = True
    imitates: bool = True
    policy_file: str = "policy.zip"
    local_search_share: float = 0.5


_AGENTS: dict[str, AgentEntry] = {}

#: The agent used unless another is named: the learned move policy, which found the improvements
#: the hierarchical planner did not on equal budgets (benchmarks/results/agent.md, issue 17).
DEFAULT_AGENT = "moves"


def register_agent(entry: AgentEntry) -> None:
    """Add ``entry`` under ``entry.name`` (replacing an agent of that name)."""
    if not entry.name or not isinstance(entry.name, str):
        raise UnknownAgentError(f"an agent name must be a non-empty string, got {entry.name!r}")
    _AGENTS[entry.name] = entry


def agent_names() -> tuple[str, ...]:
    """The registered agents' names, in registration order."""
    return tuple(_AGENTS)


def grouper_agents() -> tuple[str, ...]:
    """The agents whose action is the hierarchical one (a grouper forms the groups they place):
    the only ones the number of groups (``--groups``, ``SearchConfig.num_groups``) applies to."""
    return tuple(name for name, entry in _AGENTS.items() if entry.hierarchical)


def get_agent(name: str) -> AgentEntry:
    """The agent registered as ``name``.

    Raises:
        UnknownAgentError: no such agent; the message lists the known ones.
    """
    try:
        return _AGENTS[name]
    except (KeyError, TypeError):
        raise UnknownAgentError(f"unknown agent {name!r}; expected one of {', '.join(_AGENTS)}") from None


def _build_ppo(ctx: AgentContext) -> SearchAgent:
    # hierarchical or flat: the environment's action space decides which.
    from placer.search.agents.hierarchical.ppo import make_ppo
    from placer.search.agents.sb3 import SB3Agent

    model = make_ppo(ctx.env, ctx.ppo, seed=ctx.seed, tensorboard_log=ctx.tensorboard_log, rng=ctx.rng)
    return SB3Agent(model, env=ctx.env)


def _build_moves(ctx: AgentContext) -> SearchAgent:
    from placer.search.agents.moves import MoveAgent

    agent = MoveAgent(ctx.env, ctx.problem, ctx.rng, ctx.num_envs, seed=ctx.seed)
    if ctx.pretrained is True:
        agent.start_pretrained()
    elif ctx.pretrained:
        agent.start_pretrained(Path(ctx.pretrained))
    return agent


def _build_reinforce(ctx: AgentContext) -> SearchAgent:
    from placer.search.agents.reinforce import ReinforceAgent

    return ReinforceAgent(ctx.env, ctx.reinforce)


def _build_sequential(ctx: AgentContext) -> SearchAgent:
    # Up to 8 environments of its own; an episode (one placement) is one step per group.
    from placer.search.agents.sb3 import SB3Agent
    from placer.search.agents.sequential import make_sequential_model

    model = make_sequential_model(ctx.problem, seed=ctx.seed, tensorboard_log=ctx.tensorboard_log,
                                  num_envs=min(ctx.num_envs, 8), env_kwargs=dict(ctx.env_kwargs))
    return SB3Agent(model, steps_per_placement=ctx.problem.num_nodes)


register_agent(AgentEntry("moves", "learned move policy: proposes coordinated (group, device) moves around the "
                          "incumbent, trained by policy gradient on the simulated improvement",
                          _build_moves, hierarchical=False, imitates=False, policy_file="moves.pt",
                          local_search_share=0.25))
register_agent(AgentEntry("hierarchical", "grouper + seq2seq placer, trained with PPO", _build_ppo))
register_agent(AgentEntry("reinforce", "the same network trained with REINFORCE and a moving-average baseline",
                          _build_reinforce, policy_file="policy.pt"))
register_agent(AgentEntry("flat", "no grouper: the seq2seq placer places every node itself (PPO)",
                          _build_ppo, hierarchical=False))
register_agent(AgentEntry("sequential", "MaskablePPO placing one group per step (several environments)",
                          _build_sequential, hierarchical=False, batched=False, imitates=False))
