"""One exception root for the library; every error a user can act on derives from it."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "CorruptFileError",
    "DreamrError",
    "InputError",
    "InvalidImageError",
    "InvalidQuestionError",
    "ModelLoadError",
]


class DreamrError(Exception):
    """Root of every error raised by dreamr-stream."""


class ConfigError(DreamrError, ValueError):
    """A configuration value is invalid."""


class CorruptFileError(DreamrError, ValueError):
    """A file the library wrote (a log, a checkpoint) holds what no crash of its writer explains."""


class InputError(DreamrError, ValueError):
    """A request's input is invalid; nothing was computed."""


class InvalidImageError(InputError):
    """The image is missing, unreadable, truncated, too large or not an image."""


class InvalidQuestionError(InputError):
    """The question is empty or too long."""


class ModelLoadError(DreamrError):
    """A model folder could not be loaded."""


class BackendError(DreamrError):
    """A model call failed while serving a request."""
