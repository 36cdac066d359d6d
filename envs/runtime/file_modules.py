"""Model files a job's pickle refers to, loaded in the worker under the parent's module names.

``graphs.model_file`` imports a model file as a module named ``placer_model_<stem>_<digest>``.
Whatever the file defines (a ``namedtuple`` output type, a dataclass, a function, a custom
operator it registers) is pickled by that name, and a worker process that unpickles the job
without having imported the file under the same name fails: a model whose forward returns a
namedtuple defined in its file had every placement measured over ``cpu:0,cpu:1`` fail with
"No module named 'placer_model_namedtuple_out_e89431a73fc2'". The launcher writes the loaded
files beside the job (:func:`write_file_modules`); each worker loads them before the job
(:func:`load_file_modules`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from graphs.model_file import import_file_as

__all__ = ["file_modules", "write_file_modules", "load_file_modules"]

#: The file beside ``job.pt`` that lists them.
MODULES_FILE = "modules.json"


def file_modules() -> dict[str, str]:
    """The model files loaded by path in this process: module name -> file."""
    return {name: str(mod.__file__) for name, mod in list(sys.modules.items())
            if name.startswith("placer_model_") and getattr(mod, "__file__", None)}


def write_file_modules(job_dir: Path) -> None:
    """List :func:`file_modules` in ``job_dir`` for the workers."""
    (Path(job_dir) / MODULES_FILE).write_text(json.dumps(file_modules()))


def load_file_modules(job_dir: Path) -> None:
    """Load the model files ``job_dir`` lists under their recorded names (a job without the list,
    written by an older launcher, loads none).

    Raises:
        ModelFileError: a listed file has no loader; whatever else a file raises as it loads.
    """
    listed = Path(job_dir) / MODULES_FILE
    if not listed.exists():
        return
    for name, path in json.loads(listed.read_text()).items():
        if name in sys.modules:
            continue
        import_file_as(name, path)
