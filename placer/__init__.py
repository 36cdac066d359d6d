"""placer: learn where each part of a PyTorch model should run.

The top-level API::

    import placer
    result = placer.optimize(model, (x,), cluster="4xK40", budget="1m")
    placed = result.apply()
    placement = placer.load("out/placement.json", model=model, example_inputs=(x,))
    placed = placer.apply(model, placement, example_inputs=(x,))
    placer.retain_freed_memory()  # on CPUs: the allocator placer's profile and workers run with

Bad input (a model that cannot be captured or trained, unknown devices, no placement that fits)
raises a ``placer.PlacerError`` whose message says what was wrong and what was expected; any
other exception is a bug in placer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["optimize", "apply", "load", "OptimizeResult", "place", "PlacementTuner", "retain_freed_memory",
           "PlacerError"]


def __getattr__(name: str) -> Any:
    # Imported lazily so that `python -m placer --help` and `import placer.options` stay light.
    import importlib

    if name == "optimize":
        return importlib.import_module("placer.optimizing.run").optimize
    if name == "OptimizeResult":
        return importlib.import_module("placer.result").OptimizeResult
    if name in ("apply", "load"):
        return getattr(importlib.import_module("placer.api"), name)
    if name == "retain_freed_memory":
        return importlib.import_module("graphs.cpu_allocator").retain_freed_memory
    if name == "PlacerError":  # the base of every error bad input raises (the CLI's exit status 2)
        return importlib.import_module("graphs.errors").PlacerError
    if name in ("place", "PlacementTuner"):
        return getattr(importlib.import_module("placer.integrations"), name)
    raise AttributeError(f"module 'placer' has no attribute {name!r}")
