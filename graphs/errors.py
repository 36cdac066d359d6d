"""The error types placer raises for bad input.

Every error a user can cause derives from :class:`PlacerError`; the CLI prints its
message (no traceback) and exits with status 2.
"""


class PlacerError(Exception):
    """Base of every user-facing placer error: the message says what was wrong and what was expected."""


class ModelFileError(PlacerError):
    """A model file that cannot be loaded or does not follow the model-file contract."""


class CaptureError(PlacerError):
    """A model that neither torch.fx nor torch.export could capture."""


class GraphError(PlacerError):
    """A placement graph that is malformed or does not fit what was asked of it."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, ``(no message)`` when it has none.

    >>> first_line(ValueError("bad size\\nmore")), first_line(KeyError())
    ('bad size', '(no message)')
    """
    text = str(exc).strip()
    return text.splitlines()[0] if text else "(no message)"


def kind_and_first_line(exc: BaseException) -> str:
    """``exc``'s kind and the first line of its message, uncut (a rank's error file, a worker's
    reply); a kind alone, ending in its colon, where there is no message (so that a reader that
    follows a line ending in ``:`` to its cause does so).

    >>> kind_and_first_line(ValueError("bad size\\nmore")), kind_and_first_line(KeyError())
    ('ValueError: bad size', 'KeyError:')
    """
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else f"{type(exc).__name__}:"


def one_line_reason(exc: BaseException, limit: int = 240) -> str:
    """One line on why a tracer (or any step) failed: the exception's kind and the first line of its message."""
    kind = type(exc).__name__
    text = first_line(exc)
    if "DataDependent" in kind or "data-dependent" in text:
        text = f"Python control flow depends on tensor values ({text})"
    if len(text) > limit:
        text = text[: limit - 3] + "..."
    return f"{kind}: {text}"
