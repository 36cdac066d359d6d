"""stable-baselines3 callback that feeds every rollout batch to a :class:`BestTracker`."""

from __future__ import annotations

import numpy as np
from stable_baselines3.common.callbacks import BaseCallback

from placer.search.tracker import BestTracker, StopSearch


class TrackerCallback(BaseCallback):
    """Reads ``step_time``/``fits``/``placement`` from the env infos after every vectorised step.

    Only finished episodes count as evaluated placements (a whole-graph env finishes every
    step; a sequential env once per graph).  With an ``improver``
    (:class:`placer.search.local_search.LocalSearch`) its share of evaluations runs after
    every batch of the policy's.  When the tracker says stop, the reason is kept in
    :attr:`stop_reason` and ``False`` ends ``model.learn``.
    """

    def __init__(self, tracker: BestTracker, verbose: int = 0, improver=None) -> None:
        super().__init__(verbose)
        self.tracker = tracker
        self.improver = improver  # a LocalSearch interleaved after every policy batch, or None
        self.stop_reason: str | None = None

    def _on_step(self) -> bool:
        infos = self.locals["infos"]
        dones = self.locals.get("dones")
        done_idx = [i for i in range(len(infos)) if dones is None or dones[i]]
        done_idx = [i for i in done_idx if "step_time" in infos[i] and "placement" in infos[i]]
        if not done_idx:
            return True
        rows = np.stack([np.asarray(infos[i]["placement"]) for i in done_idx])
        times = np.array([infos[i]["step_time"] for i in done_idx], dtype=np.float64)
        # "valid" (the time is real, not the invalid penalty) where the env says it, else "fits".
        fits = np.array([infos[i].get("valid", infos[i].get("fits", True)) for i in done_idx], dtype=bool)
        try:
            self.tracker.record(rows, times, fits, next_batch=len(infos))
            if self.improver is not None:
                self.improver.after_policy_batch(len(done_idx), next_batch=len(infos))
        except StopSearch as stop:
            self.stop_reason = stop.reason
            return False
        finally:
            if np.isfinite(self.tracker.best_step_time):
                self.logger.record("search/best_step_time", self.tracker.best_step_time)
            self.logger.record("search/evaluated", self.tracker.evaluated)
            self.logger.record("search/mean_step_time", float(times.mean()))
        return True
