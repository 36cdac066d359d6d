"""``placer.optimize``: from a model to a checked, saved placement in one call.

The CLI's ``optimize`` subcommand is a thin layer over :func:`optimize`. The run is a chain
of small stages (:mod:`placer.optimizing.stages`) over one frozen
:class:`~placer.optimizing.config.OptimizeConfig`:

1. prepare: resolve the devices — real ones (``devices=["cpu", "cuda:0"]``, step times
   measured to confirm the winner) or a simulated cluster (``cluster="4xK40"`` or a spec
   file) — then load and capture the model, profile its ops on the real devices present,
   group them;
2. compile the placement problem;
3. run the baselines;
4. search with the agent from the best of them, keeping the best placement so far on disk;
   the search's reward (``reward=``) is the batched simulator (``simulated``), the measured
   step time of every placement the agent proposes (``measured``), or the simulator
   recalibrated from measurements of its best candidates in rounds during the search
   (``hybrid``, the default on real devices) — see :mod:`placer.measuring`;
5. confirm: on real devices, measure the best candidates and keep the measured fastest;
6. check: apply the winner and compare outputs and gradients with the original model;
7. write the results.

Example::

    result = placer.optimize(model, (x,), cluster="4xK40", budget="1m")
    placed = result.apply()
    print(result.compare())
    result.save("out/")
"""

from __future__ import annotations

from typing import Any

from graphs.random_state import kept_random_state
from placer.optimizing import stages
from placer.optimizing.config import ModelSource, OptimizeConfig, make_config
from placer.optimizing.earlier_results import put_back_previous, set_aside_previous
from placer.result import OptimizeResult


def optimize(model: ModelSource, example_inputs: Any = None, **options: Any) -> OptimizeResult:
    """Find a fast placement of ``model`` and check it.

    Args:
        model: an ``nn.Module`` (with ``example_inputs``), a model file path, or ``"zoo:<name>"``.
        example_inputs: a tuple of inputs (for an ``nn.Module``).
        options: the fields of :class:`~placer.optimizing.config.OptimizeConfig`, by keyword:
            ``devices`` or ``cluster``, ``budget`` (default
            :data:`~placer.search.budget.DEFAULT_BUDGET`, two minutes), ``reward``,
            ``groups``, ``seed``, ``memory``, ``baselines``, ``agent``, ``out_dir``,
            ``resume``, ``pretrained``, ``model_args``, ``loss_fn``, ``optimizer_fn``, ``check``,
            ``progress``, ``cache_dir``, ``verbose``, ``measurer``.

    Raises:
        PlacerError subclasses for bad input, before any long work starts.
    """
    return run(make_config(model, example_inputs, **options))


def run(config: OptimizeConfig) -> OptimizeResult:
    """Run every stage of ``config``'s optimisation and return the result. The caller's
    random states (Python, numpy, torch) are as they were afterwards
    (:func:`graphs.random_state.kept_random_state`)."""
    with kept_random_state():
        return _run(config)


def _run(config: OptimizeConfig) -> OptimizeResult:
    prepared = stages.prepare_run(config)
    compiled = stages.compile_run(config, prepared)
    baselines = stages.run_baselines(config, compiled)
    moved = set_aside_previous(config, compiled)
    try:
        with stages.measuring(config, compiled) as measurer:
            searched = stages.search_run(config, compiled, baselines, measurer)
            confirmed = stages.confirm(config, compiled, baselines, searched, measurer)
        report, check_seconds = stages.check_winner(config, compiled, confirmed)
        seconds = {"prepare": prepared.seconds, "baselines": baselines.seconds, "search": searched.seconds,
                   **confirmed.seconds}
        if report is not None:
            seconds["check"] = check_seconds
        return stages.write(config, compiled, searched, confirmed, report, seconds)
    except Exception:
        put_back_previous(compiled, moved)
        raise
    except KeyboardInterrupt:  # an interrupt keeps this run's best in out_dir, as documented
        put_back_previous(compiled, moved, interrupted=True)
        raise
