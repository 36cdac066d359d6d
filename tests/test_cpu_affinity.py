"""Worker processes of a multi-process CPU job get cores of their own (envs.runtime.cpu_affinity)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from envs.runtime.cpu_affinity import pin_worker, worker_cores


def test_each_worker_gets_its_own_block_of_cores_in_rank_order():
    cores = [4, 5, 6, 7]
    assert [worker_cores(r, 4, 1, cores) for r in range(4)] == [(4,), (5,), (6,), (7,)]
    assert [worker_cores(r, 2, 2, cores) for r in range(2)] == [(4, 5), (6, 7)]


def test_workers_that_need_more_cores_than_there_are_are_not_pinned():
    assert worker_cores(0, 4, 1, [0, 1]) is None
    assert worker_cores(1, 2, 2, [0, 1, 2]) is None


def test_a_rank_outside_the_world_is_refused():
    with pytest.raises(ValueError, match="expected 0 <= rank < world"):
        worker_cores(2, 2, 1, [0, 1])


def test_pinning_can_be_turned_off():
    assert pin_worker(1, {"RANK": "0", "WORLD_SIZE": "1", "PLACER_PIN_WORKERS": "0"}) is None


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity"), reason="no sched_setaffinity on this system")
def test_a_worker_process_is_pinned_to_the_cores_of_its_rank():
    """In a child process (pinning this one would slow the rest of the suite)."""
    code = ("import json, os; from envs.runtime.cpu_affinity import pin_worker; "
            "got = pin_worker(1, {'RANK': '1', 'WORLD_SIZE': '2'}); "
            "print(json.dumps([got, sorted(os.sched_getaffinity(0))]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    got, affinity = json.loads(out)
    expected = worker_cores(1, 2, 1, sorted(os.sched_getaffinity(0)))
    if expected is None:  # a one-core machine: nothing pinned, nothing changed
        assert got is None and affinity == sorted(os.sched_getaffinity(0))
    else:
        assert tuple(got) == expected and affinity == list(expected)
