"""Root conftest: the doctests of graphs/, envs/ and placer/ run with the suite (see pyproject's
``[tool.pytest.ini_options]``); a module whose import needs an optional extra that is not
installed is left out of that collection instead of failing it."""

from __future__ import annotations

import importlib.util

# module file -> the packages (any one suffices) its import needs, from an optional extra
_NEEDS_EXTRA = {
    "placer/integrations/lightning.py": ("lightning", "pytorch_lightning"),  # extra "lightning"
    "envs/sim/simulator_numba.py": ("numba",),  # extra "jit"
}


def _installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


collect_ignore = [path for path, packages in _NEEDS_EXTRA.items() if not any(_installed(p) for p in packages)]
