"""Measuring placements while ``optimize`` runs: the ``measured`` and ``hybrid`` reward modes.

- :mod:`placer.measuring.measurer`: :class:`~placer.measuring.measurer.PlacementMeasurer`, the
  measurer of group placements the reward model calls, and the log of every measurement;
- :mod:`placer.measuring.hybrid_rounds`: :class:`~placer.measuring.hybrid_rounds.HybridRounds`,
  hybrid mode's measurement rounds during the search;
- :mod:`placer.measuring.confirm`: after the search, the best candidates, pipelines and DDP
  measured, and the comparison table given their times;
- :mod:`placer.measuring.summary`: what was measured, for the report and ``calibration.json``.

* ``measured``: the reward model sends every placement the agent proposes here (new ones
  of a batch in one backend call); a failed run (out of memory, a worker that died or
  hung) comes back invalid with its reason and earns the invalid penalty.
* ``hybrid``: the simulator scores every placement; :class:`~placer.measuring.hybrid_rounds.HybridRounds`,
  the search's progress callback, owns the :class:`~envs.gym.measured_rewards.HybridReward` the search
  runs on (``env_kwargs={"reward_mode": rounds.reward_model}``), measures its best simulated
  candidates at set points of the budget and lets it recalibrate the simulator from all
  measurements so far (:mod:`envs.sim.calibration`), so the rest of the search runs on the
  recalibrated simulator.

Either way optimize runs the best candidates once more at the end, beside the single devices in
two jobs (:func:`~placer.measuring.confirm.confirm_candidates`), and only those times pick the winner.
The package re-exports nothing: import from its modules.
"""
