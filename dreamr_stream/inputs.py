"""Input checks that run before any model work: images and questions.

Why a narrow image surface: Pillow opens some forty formats, a few of them through external
programs (EPS runs Ghostscript where it is installed) or rarely used parsers. A request decodes
only what a browser or a camera makes: PNG, JPEG, WebP, GIF (its first frame) and BMP. Why a
downscale: a model reads a few hundred pixels a side, and an upload of thousands would become
thousands of visual tokens; ``InputLimits.max_image_side`` bounds it before any model work.
"""

from __future__ import annotations

import base64
import binascii
import io
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, UnidentifiedImageError

from dreamr_stream.config import InputLimits
from dreamr_stream.errors import InvalidImageError, InvalidQuestionError

__all__ = ["IMAGE_FORMATS", "ImageInput", "check_question", "load_image"]

#: The formats a request may send, by Pillow's names (an animated GIF gives its first frame).
IMAGE_FORMATS = ("PNG", "JPEG", "WEBP", "GIF", "BMP")
_FORMAT_NAMES = "PNG, JPEG, WebP, GIF or BMP"

ImageInput = Union[bytes, bytearray, memoryview, str, Path, Image.Image]


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise InvalidImageError("data URLs must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError("the image string is not valid base64 (pass a file as a pathlib.Path)") from e


def _to_bytes(source: ImageInput, limits: InputLimits) -> bytes:
    """The encoded image. A ``str`` is always data (base64 or a data URL), never a file name:
    strings arrive from users, web clients and models' tool calls, and none of them may make
    the library read a file of this machine. A caller that means a file passes a ``Path``."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Path):
        return _read_file(source, limits)
    if isinstance(source, str):
        stripped = source.strip()
        if not stripped:
            raise InvalidImageError("the image is empty")
        return _decode_base64(stripped)
    raise InvalidImageError(
        f"unsupported image type {type(source).__name__}: pass bytes, base64, a pathlib.Path or a PIL image"
    )


def _read_file(path: Path, limits: InputLimits) -> bytes:
    if not path.is_file():
        raise InvalidImageError(f"no image file at {path}")
    if path.stat().st_size > limits.max_image_bytes:
        raise InvalidImageError(f"image file is larger than {limits.max_image_bytes} bytes")
    return path.read_bytes()


def _check_size(width: int, height: int, limits: InputLimits) -> None:
    if width * height > limits.max_image_pixels:
        raise InvalidImageError(
            f"image is {width}x{height} = {width * height} pixels, over the limit of {limits.max_image_pixels}; "
            "downscale it first"
        )
    if min(width, height) < limits.min_image_side:
        raise InvalidImageError(f"image is {width}x{height}; each side must be at least {limits.min_image_side} px")


def _fit(image: Image.Image, limits: InputLimits) -> Image.Image:
    """``image`` downscaled (aspect kept, Lanczos) so that its long side is at most
    ``limits.max_image_side``; an image within it is returned as it is. A very thin image keeps
    a short side of ``min_image_side`` (or its own, if smaller) rather than vanish to a line."""
    long_side = max(image.width, image.height)
    if long_side <= limits.max_image_side:
        return image
    scale = limits.max_image_side / long_side

    def side(n: int) -> int:
        return min(limits.max_image_side, max(round(n * scale), min(n, limits.min_image_side)))

    return image.resize((side(image.width), side(image.height)), Image.Resampling.LANCZOS)


def load_image(source: ImageInput, limits: InputLimits | None = None) -> Image.Image:
    """Decode and validate an image; returns a fully loaded RGB PIL image of at most
    ``limits.max_image_side`` pixels a side (larger ones are downscaled, aspect kept).

    Accepts raw bytes, base64 (optionally a data URL), a ``pathlib.Path`` or a PIL image; a
    ``str`` is never opened as a file. Only :data:`IMAGE_FORMATS` are decoded. The pixel count
    is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    limits = limits or InputLimits()
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, limits)
        return _fit(source.convert("RGB"), limits)
    data = _to_bytes(source, limits)
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=IMAGE_FORMATS)
            _check_size(image.width, image.height, limits)
            image.load()  # decode now: truncated files fail here, not inside the model call
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"image pixel count is over the limit (a decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:  # its message names an internal BytesIO, not the user's file
        raise InvalidImageError(
            f"not a readable image: {len(data)} bytes in none of the accepted formats ({_FORMAT_NAMES})"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"the image data is corrupt or truncated: {e}") from e
    return _fit(image.convert("RGB"), limits)


def check_question(question: object, limits: InputLimits | None = None) -> str:
    """A stripped, non-empty question of bounded length."""
    limits = limits or InputLimits()
    if not isinstance(question, str):
        raise InvalidQuestionError(f"the question must be a string, not {type(question).__name__}")
    text = question.strip()
    if not text:
        raise InvalidQuestionError("the question is empty")
    if len(text) > limits.max_question_chars:
        raise InvalidQuestionError(f"the question is {len(text)} characters; the limit is {limits.max_question_chars}")
    return text
