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
