"""User-facing errors: one line that names the file or option and says what to do."""

from __future__ import annotations


class DreamtuneError(Exception):
    """An error caused by the user's input. The CLI prints its message alone, without a traceback."""


class ConfigError(DreamtuneError):
    """A config option is unknown, of the wrong type or out of range."""


class ImageError(DreamtuneError):
    """An image file cannot be read as an image."""


class ModelLoadError(DreamtuneError):
    """A base model or artifact path cannot be loaded."""


class TrainingDiverged(DreamtuneError):
    """The loss became NaN or infinite."""


class TrainingStopped(KeyboardInterrupt):
    """Training was asked to stop (Ctrl-C, SIGTERM) and wrote a checkpoint first; the message names it.

    A KeyboardInterrupt, so that code which treats Ctrl-C as the end of the work still does.
    """


def first_line(error: BaseException, limit: int = 300) -> str:
    """The first line of an exception's message (its type name when empty), for a one-line error."""
    text = str(error).strip()
    return text.splitlines()[0][:limit] if text else type(error).__name__
