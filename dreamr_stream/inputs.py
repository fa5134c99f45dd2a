"""Input checks that run before any model work: images and questions."""

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

__all__ = ["ImageInput", "check_question", "load_image"]

ImageInput = Union[bytes, bytearray, memoryview, str, Path, Image.Image]


def _decode_base64(text: str) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if ";base64" not in header:
            raise InvalidImageError("data URLs must be base64-encoded (data:image/png;base64,...)")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise InvalidImageError("the image string is neither an existing file nor valid base64") from e


def _to_bytes(source: ImageInput, limits: InputLimits) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    if isinstance(source, Path):
        return _read_file(source, limits)
    if isinstance(source, str):
        stripped = source.strip()
        if not stripped:
            raise InvalidImageError("the image is empty")
        if len(stripped) < 4096 and not stripped.startswith("data:"):
            path = Path(stripped).expanduser()
            if path.is_file():
                return _read_file(path, limits)
        return _decode_base64(stripped)
    raise InvalidImageError(
        f"unsupported image type {type(source).__name__}: pass bytes, base64, a path or a PIL image"
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


def load_image(source: ImageInput, limits: InputLimits | None = None) -> Image.Image:
    """Decode and validate an image; returns a fully loaded RGB PIL image.

    Accepts raw bytes, base64 (optionally a data URL), a file path or a PIL image. The pixel
    count is checked from the header before decoding, so a decompression bomb costs nothing.
    """
    limits = limits or InputLimits()
    if isinstance(source, Image.Image):
        _check_size(source.width, source.height, limits)
        return source.convert("RGB")
    data = _to_bytes(source, limits)
    if not data:
        raise InvalidImageError("the image is empty (0 bytes)")
    if len(data) > limits.max_image_bytes:
        raise InvalidImageError(f"image is {len(data)} bytes, over the limit of {limits.max_image_bytes}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_size(image.width, image.height, limits)
            image.load()  # decode now: truncated files fail here, not inside the model call
    except InvalidImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InvalidImageError(f"image pixel count is over the limit (a decompression bomb?): {e}") from e
    except UnidentifiedImageError as e:  # its message names an internal BytesIO, not the user's file
        raise InvalidImageError(
            f"not a readable image: {len(data)} bytes in no format Pillow reads (PNG, JPEG, GIF, BMP, WebP, ...)"
        ) from e
    except (OSError, SyntaxError, ValueError) as e:
        raise InvalidImageError(f"the image data is corrupt or truncated: {e}") from e
    return image.convert("RGB")


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
