"""placer inside training jobs: ``place`` (a placed model, cached), the online
``PlacementTuner``, and the PyTorch Lightning / Hugging Face glue.

Lightning and transformers are optional: ``placer.integrations.lightning`` and
``placer.integrations.huggingface`` import them only when used.
"""

from __future__ import annotations

from typing import Any

__all__ = ["place", "PlaceInfo", "PlacementTuner", "TunerReport", "default_cache_dir"]


def __getattr__(name: str) -> Any:
    # Lazy, so importing the package does not pull the search stack (sb3, pandas) in.
    import importlib

    if name in ("place", "PlaceInfo", "default_cache_dir"):
        return getattr(importlib.import_module("placer.integrations.loop"), name)
    if name in ("PlacementTuner", "TunerReport"):
        return getattr(importlib.import_module("placer.integrations.tuner"), name)
    raise AttributeError(f"module 'placer.integrations' has no attribute {name!r}")
