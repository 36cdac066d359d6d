"""Which fitting placement wins the comparison, and which pipelines are set aside before it is picked.

:func:`pick_winner` takes the fastest row of the comparison table that fits (where some
rows were measured, the fastest measured one); :func:`_set_aside_inexact_splits` first
takes out the pipelines whose batch split the numerical check would refuse (BatchNorm in
training mode), so the next fastest placement wins instead of the run failing after the
search.

Apart from the confirm stage (:mod:`placer.optimizing.stages`) that calls them: the rule
of the choice on its own, over the table, readable and testable without a run.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import pandas as pd

from envs.runtime.check import CheckReport, check_batch_split
from envs.sim.pipeline_layout import Pipeline
from graphs.errors import PlacerError
from placer.optimizing.config import OptimizeConfig
from placer.optimizing.host_checks import within_host_memory
from placer.optimizing.stage_outputs import Compiled

log = logging.getLogger(__name__)


def _set_aside_inexact_splits(config: OptimizeConfig, compiled: Compiled, fitting: pd.DataFrame,
                              table: pd.DataFrame, pipelines: Mapping[str, Pipeline],
                              checks: dict[tuple[int, int], CheckReport]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``fitting`` without the pipelines whose batch split changes what the model computes
    (BatchNorm in training mode normalises each micro-batch by its own statistics), tried
    fastest first until the winner is one that splits exactly or is no pipeline (DDP is one:
    a stage replicated; a row slower than the winner is never checked). Each row set aside is
    marked in the table (``set_aside``, and the reason in its note: the recommendation skips
    it) and warned about.
    Without the check, nothing is set aside.

    The winner's check would refuse such a pipeline after the search; here the next-best
    placement wins instead, so a model with BatchNorm still gets a result. Every split checked
    is left in ``checks`` by (M, R), for the winner's check to reuse.
    """
    table = table.copy()
    table["set_aside"] = False
    if not config.check:
        return fitting, table
    run = compiled.run

    def verdict(microbatches: int, replicas: int) -> str | None:
        if (microbatches, replicas) not in checks:
            with within_host_memory(run.cluster, "the check of a pipeline's batch split",
                                    "the model on the full batch and on its parts"):
                checks[microbatches, replicas] = check_batch_split(run.spec, run.captured, microbatches, replicas)
        report = checks[microbatches, replicas]
        return None if report.split_ok else report.describe_split()

    def add_note(method: str, text: str) -> None:
        at = table["method"] == method
        table.loc[at, "note"] = [f"{n}; {text}".lstrip("; ") for n in table.loc[at, "note"].fillna("")]

    def set_aside(method: str, why: str) -> None:
        log.warning("%s set aside: %s", method, why)
        table.loc[table["method"] == method, "set_aside"] = True
        add_note(method, f"set aside: {why}")

    # DDP is one of the pipelines (one stage replicated): checked only when it is the fastest
    # left, as a pipeline is; slower than the winner, its split cannot change the result.
    while not fitting.empty:
        method = str(pick_winner(fitting)["method"])
        pipeline = pipelines.get(method)
        if pipeline is None:
            break
        why = verdict(pipeline.microbatches, pipeline.num_replicas)
        if why is None:
            break
        set_aside(method, f"{_owned(why)}; the next fastest placement is taken")
        fitting = fitting[fitting["method"] != method]
    # The rows the loop did not reach: one whose split was checked for another row has its
    # verdict; the rest say they were not checked, so an unmarked row is not read as exact.
    for method, pipeline in pipelines.items():
        key = (pipeline.microbatches, pipeline.num_replicas)
        if key[0] * key[1] <= 1 or bool(table.loc[table["method"] == method, "set_aside"].any()):
            continue
        if key in checks:
            if not checks[key].split_ok:
                set_aside(method, _owned(checks[key].describe_split()))
            continue
        add_note(method, "batch split not checked (slower than the winner)")
    if fitting.empty:
        why = next(c.describe_split() for c in checks.values() if not c.split_ok)
        raise PlacerError(f"every placement that fits is a pipeline whose micro-batches change what the model "
                          f"computes ({why}); rerun with --no-check to accept one unchecked")
    return fitting, table


def _owned(why: str) -> str:
    """A split's verdict (:meth:`CheckReport.describe_split`) as the reason its row is set aside.

    >>> _owned("replicas' shares of 8 samples change what the model computes (a running mean)")
    "its replicas' shares of 8 samples change what the model computes (a running mean)"
    """
    if why.startswith("cannot"):  # no part ran: the verdict is about the split, not its micro-batches
        return f"placer {why}"
    return f"its {why}"  # "its replicas' shares of 8 samples ...", "its micro-batches of 4 samples ..."


def pick_winner(fitting: pd.DataFrame) -> pd.Series:
    """The fastest fitting row; where some rows were measured, the fastest measured one.

    Measured and simulated step times are not comparable (the simulator leaves out the
    runtime's overheads), so once real measurements exist only they decide.
    """
    measured = fitting[fitting["source"] == "measured"]
    pool = measured if not measured.empty else fitting
    return pool.sort_values("step_time", kind="stable").iloc[0]
