"""What is derived from a placement problem, computed once per problem (:func:`cached_per_problem`).

A simulator's kernel arrays (:mod:`envs.sim.loop_arrays`), the pipeline search's prefix tables
(:mod:`envs.sim.stage_costs`, :mod:`envs.sim.pipeline`) are built from a
:class:`~envs.sim.problem.PlacementProblem` alone; the cache keeps each beside its problem
while the problem lives.
"""

from __future__ import annotations

import functools
import weakref
from collections.abc import Callable
from typing import TypeVar

from envs.sim.problem import PlacementProblem

_Derived = TypeVar("_Derived")


def cached_per_problem(build: Callable[[PlacementProblem], _Derived]) -> Callable[[PlacementProblem], _Derived]:
    """``build(problem)`` computed once per problem and kept while the problem lives.

    Problems are frozen and compared by identity, so what is derived from one (a simulator's
    kernel arrays, the pipeline search's prefix tables) can live beside it in a weak-keyed
    cache; a changed problem (``dataclasses.replace``) is a new key.
    """
    cache: weakref.WeakKeyDictionary[PlacementProblem, _Derived] = weakref.WeakKeyDictionary()

    @functools.wraps(build)
    def cached(problem: PlacementProblem) -> _Derived:
        hit = cache.get(problem)
        if hit is None:
            hit = cache[problem] = build(problem)
        return hit

    return cached
