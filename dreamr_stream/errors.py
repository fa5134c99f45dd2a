"""One exception root for the library; every error a user can act on derives from it.

Warnings have a root of their own (``DreamrWarning``), so that a caller can filter, log or turn
into errors (``warnings.simplefilter("error", UncalibratedVerificationWarning)``) exactly ours."""

from __future__ import annotations

__all__ = [
    "BackendError",
    "ConfigError",
    "CorruptFileError",
    "DreamrError",
    "DreamrWarning",
    "InputError",
    "InvalidImageError",
    "InvalidQuestionError",
    "ModelLoadError",
    "UncalibratedVerificationWarning",
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


class DreamrWarning(UserWarning):
    """Root of every warning dreamr-stream issues."""


class UncalibratedVerificationWarning(DreamrWarning):
    """A served target runs on default TBVM settings that nobody measured for it.

    The server does not say which judge template or threshold suit its model, so without a
    settings folder (``settings_from``) verification accepts or rejects without calibration:
    measured on the demo pair, FPSR then ran at 0.42x the served model alone instead of 1.37x."""
