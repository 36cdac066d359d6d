"""A PPO rollout buffer that stores a placement search's observation once, not once per env.

Every env of a placement search sees the same graph, so SB3's ``DictRolloutBuffer`` copies
the same observation (a 200-node graph is ~30 kB, ~8 MB for 256 envs) into the buffer at
every step, flattens it, gathers it per minibatch and copies it into a tensor again — about
a seventh of a training step on a 200-node problem.  This buffer keeps one copy while all
observations are identical and hands minibatches a broadcast view (stride 0 over the batch),
which :class:`~placer.search.agents.hierarchical.network.PlacementNetwork` recognises as "one shared
graph" without comparing rows.  The first observation that differs switches it back to
SB3's behaviour for the rest of the rollout (the earlier rows are filled in), so any other
use stays correct.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.buffers import DictRolloutBuffer
from stable_baselines3.common.type_aliases import DictRolloutBufferSamples


def _same_rows(obs: dict[str, np.ndarray], ref: dict[str, np.ndarray] | None) -> bool:
    """Every row of every key of ``obs`` equals row 0 (and ``ref`` when given)."""
    for key, value in obs.items():
        arr = np.asarray(value)
        first = arr[:1]
        if ref is not None and not np.array_equal(first[0], ref[key]):
            return False
        if not (arr == first).all():
            return False
    return True


class SharedObservationRolloutBuffer(DictRolloutBuffer):
    """``DictRolloutBuffer`` that stores identical observations once (see the module docstring).

    ``rng`` shuffles the minibatches of a shared rollout (default: a fresh, unseeded generator;
    :func:`~placer.search.agents.hierarchical.ppo.make_ppo` passes the search's).
    """

    def __init__(self, *args: Any, rng: np.random.Generator | None = None, **kwargs: Any) -> None:
        self.rng = rng if rng is not None else np.random.default_rng()
        super().__init__(*args, **kwargs)

    def reset(self) -> None:
        super().reset()  # np.zeros: the full observation arrays cost nothing until written
        self._shared: dict[str, np.ndarray] | None = None
        self._all_shared = True

    def add(self, obs, action, reward, episode_start, value, log_prob) -> None:
        """As :meth:`DictRolloutBuffer.add`; the observation is kept once while all rows agree."""
        if self._all_shared and _same_rows(obs, self._shared):
            if self._shared is None:
                self._shared = {k: np.array(np.asarray(v)[0], copy=True) for k, v in obs.items()}
            self._add_transition(action, reward, episode_start, value, log_prob)
            return
        if self._all_shared:
            self._all_shared = False
            if self._shared is not None:
                for key, shared in self._shared.items():
                    self.observations[key][: self.pos] = shared
        super().add(obs, action, reward, episode_start, value, log_prob)

    def _add_transition(self, action, reward, episode_start, value, log_prob) -> None:
        """Everything :meth:`DictRolloutBuffer.add` stores except the observation."""
        if len(log_prob.shape) == 0:
            log_prob = log_prob.reshape(-1, 1)
        self.actions[self.pos] = np.array(action).reshape((self.n_envs, self.action_dim))
        self.rewards[self.pos] = np.array(reward)
        self.episode_starts[self.pos] = np.array(episode_start)
        self.values[self.pos] = value.clone().cpu().numpy().flatten()
        self.log_probs[self.pos] = log_prob.clone().cpu().numpy()
        self.pos += 1
        if self.pos == self.buffer_size:
            self.full = True

    def get(self, batch_size: int | None = None) -> Generator[DictRolloutBufferSamples, None, None]:  # type: ignore[override]
        if not self._all_shared:
            yield from super().get(batch_size)
            return
        assert self.full, ""
        total = self.buffer_size * self.n_envs
        indices = self.rng.permutation(total)
        if not self.generator_ready:
            for name in ("actions", "values", "log_probs", "advantages", "returns"):
                self.__dict__[name] = self.swap_and_flatten(self.__dict__[name])
            self.generator_ready = True
        batch_size = total if batch_size is None else batch_size
        for start in range(0, total, batch_size):
            yield self._get_samples(indices[start: start + batch_size])

    def _get_samples(self, batch_inds: np.ndarray, env=None) -> DictRolloutBufferSamples:  # type: ignore[override]
        if not self._all_shared:
            return super()._get_samples(batch_inds, env)
        assert self._shared is not None
        n = len(batch_inds)
        observations = {k: torch.as_tensor(v, device=self.device).unsqueeze(0).expand(n, *v.shape)
                        for k, v in self._shared.items()}
        return DictRolloutBufferSamples(
            observations=observations,
            actions=self.to_torch(self.actions[batch_inds].astype(np.float32, copy=False)),
            old_values=self.to_torch(self.values[batch_inds].flatten()),
            old_log_prob=self.to_torch(self.log_probs[batch_inds].flatten()),
            advantages=self.to_torch(self.advantages[batch_inds].flatten()),
            returns=self.to_torch(self.returns[batch_inds].flatten()),
        )
