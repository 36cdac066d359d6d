"""How a simulator reports a device whose peak memory does not fit: the one wording of every simulator.

The batched simulator (:mod:`envs.sim.simulator`), pipelines (:mod:`envs.sim.pipeline`), their
replicas (:mod:`envs.sim.hybrid`) and DDP (:mod:`envs.sim.data_parallel`) all say it with
:func:`memory_problem_lines`, so a report reads the same whichever simulated the placement; the
results keyed by device name share :class:`DeviceMemoryFit`.
"""

from __future__ import annotations


def memory_problem_lines(peak_memory: dict[str, float], over_memory: dict[str, float]) -> list[str]:
    """One line per device that does not fit: its peak against the memory a placement may fill
    there (usable: its memory less its reserve, a GPU's CUDA context), the one wording of
    every simulator.

    >>> memory_problem_lines({"gpu0": 3 * 2**30}, {"gpu0": 2**30})
    ['gpu0 needs 3.00 GiB where 2.00 GiB is usable (1.00 GiB over)']
    """
    return [f"{d} needs {peak_memory[d] / 2**30:.2f} GiB where {(peak_memory[d] - over) / 2**30:.2f} GiB is usable "
            f"({over / 2**30:.2f} GiB over)"
            for d, over in over_memory.items()]


class DeviceMemoryFit:
    """What a simulated step with ``peak_memory`` and ``over_memory`` by device name says of
    its fit (the pipeline's, the hybrid's and DDP's results): it fits when no device is over."""

    peak_memory: dict[str, float]
    over_memory: dict[str, float]

    @property
    def fits(self) -> bool:
        return not self.over_memory

    def memory_problems(self) -> list[str]:
        """One line per device that does not fit (:func:`memory_problem_lines`)."""
        return memory_problem_lines(self.peak_memory, self.over_memory)
