"""Size presets of the zoo model files and the checks on their arguments.

Every zoo model keeps a frozen dataclass per size ("small" for tests, "paper" for the
published configuration). A model file's ``get_model(size=..., layers=...)`` picks the
preset and replaces the fields the user overrode (e.g. ``layers=8``). Bad values raise
:class:`ZooArgumentError`, which is both a :class:`~graphs.errors.ModelFileError` (so the
CLI prints it without a traceback) and a :class:`ValueError` (what plain Python callers
of a model file expect for a bad argument).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any, TypeVar

import torch

from graphs.errors import ModelFileError

SIZES: tuple[str, ...] = ("small", "paper")
MODEL_SEED = 0
INPUT_SEED = 1

P = TypeVar("P")


class ZooArgumentError(ModelFileError, ValueError):
    """A zoo model was asked for a size or an argument value it does not have."""


def resolve(presets: Mapping[str, P], size: str, model: str, **overrides: Any) -> P:
    """Return the preset for ``size`` with every non-``None`` override applied.

    ``model`` only names the model in error messages. Overrides must be fields of the
    preset dataclass; ``None`` means "keep the preset's value".
    """
    if not isinstance(size, str) or size not in presets:
        raise ZooArgumentError(
            f"{model}: unknown size {size!r}; expected one of {', '.join(repr(s) for s in presets)}"
        )
    preset = presets[size]
    changes = {k: v for k, v in overrides.items() if v is not None}
    fields = {f.name for f in dataclasses.fields(preset)}  # type: ignore[arg-type]
    unknown = sorted(set(changes) - fields)
    if unknown:
        raise ZooArgumentError(f"{model}: unknown argument(s) {unknown}; expected some of {sorted(fields)}")
    return dataclasses.replace(preset, **changes)  # type: ignore[type-var]


def check_positive_int(model: str, name: str, value: Any) -> int:
    """Return ``value`` if it is a positive int, else raise a :class:`ZooArgumentError`."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ZooArgumentError(f"{model}: {name} must be a positive integer, got {value!r}")
    return value


def check_choice(model: str, name: str, value: Any, choices: tuple[Any, ...]) -> Any:
    """Return ``value`` if it is one of ``choices``, else raise a :class:`ZooArgumentError`."""
    if value not in choices:
        raise ZooArgumentError(f"{model}: {name} must be one of {list(choices)}, got {value!r}")
    return value


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run the body with torch's CPU generator seeded, restoring the caller's RNG after.

    Zoo models must be identical from call to call (profiles are cached by fingerprint
    and tests compare outputs) without disturbing the RNG state of the program that
    loads them, hence ``fork_rng`` around ``manual_seed``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def random_tokens(vocab: int, *shape: int) -> torch.Tensor:
    """Seeded random token ids in ``[0, vocab)`` of the given shape (int64, default device)."""
    with seeded(INPUT_SEED):
        return torch.randint(0, vocab, shape, dtype=torch.long)


def image_batch(batch_size: int, image_size: int, classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(images [b, 3, s, s] float32, labels [b] int64)``, seeded."""
    with seeded(INPUT_SEED):
        images = torch.randn(batch_size, 3, image_size, image_size)
        labels = torch.randint(0, classes, (batch_size,))
    return images, labels


def next_token_batch(vocab: int, batch_size: int, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens, targets)``, both ``[batch, seq_len]``: a seeded token stream and the same shifted by one."""
    stream = random_tokens(vocab, batch_size, seq_len + 1)
    return stream[:, :-1].contiguous(), stream[:, 1:].contiguous()


def next_token_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of ``logits [batch, seq, vocab]`` against token ids ``targets [batch, seq]``."""
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
