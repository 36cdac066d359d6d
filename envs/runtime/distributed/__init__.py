"""Placements across processes and hosts on torch.distributed.

* :mod:`envs.hardware.rank_devices` — devices named by rank (``cpu:0,cpu:1``, ``host:cpu:0``)
  and the measured :class:`~envs.hardware.cluster.Cluster` they form;
* :mod:`envs.runtime.distributed.runtime` — one rank's training step over a split placement
  (point-to-point forward activations and backward gradients);
* :mod:`envs.runtime.distributed.worker` — the worker entry point (torchrun-compatible);
* :mod:`envs.runtime.distributed.launcher` — starts and watches the local workers;
* :mod:`envs.runtime.distributed.measure` — measured step time of a placement through the runtime.
"""
