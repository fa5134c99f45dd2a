"""Input checks run before any model work and raise typed, actionable errors."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import pytest
from PIL import Image

from dreamr_stream.config import InputLimits
from dreamr_stream.errors import DreamrError, InvalidImageError, InvalidQuestionError
from dreamr_stream.inputs import check_question, load_image


def png(size: tuple[int, int] = (64, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (10, 200, 30)).save(buf, format="PNG")
    return buf.getvalue()


def test_accepts_bytes_base64_data_url_path_and_pil(tmp_path: Path) -> None:
    data = png()
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    for source in (data, b64, f"data:image/png;base64,{b64}", path, str(path), Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.size == (64, 48) and image.mode == "RGB"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a readable image"),
        (png()[:60], "corrupt or truncated"),
        ("", "empty"),
        ("!!not base64!!", "neither an existing file nor valid base64"),
        ("data:image/png,abc", "base64"),
        (12345, "unsupported image type"),
        (Path("/nonexistent/file.png"), "no image file"),
    ],
)
def test_bad_images(source: object, message: str) -> None:
    with pytest.raises(InvalidImageError, match=message) as info:
        load_image(source)  # type: ignore[arg-type]
    assert isinstance(info.value, DreamrError)


def test_pixel_cap_is_checked_from_the_header() -> None:
    # a 20000 x 20000 PNG of one colour is small on disk and 400 M pixels decoded
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, format="PNG")
    assert len(buf.getvalue()) < 200_000
    with pytest.raises(InvalidImageError, match="over the limit"):
        load_image(buf.getvalue())


def test_limits_are_configurable() -> None:
    with pytest.raises(InvalidImageError, match="bytes"):
        load_image(png(), InputLimits(max_image_bytes=10))
    with pytest.raises(InvalidImageError, match="at least"):
        load_image(png((4, 4)))


@pytest.mark.parametrize(
    ("question", "message"), [("", "empty"), ("   \n", "empty"), ("x" * 2001, "limit"), (None, "string")]
)
def test_bad_questions(question: object, message: str) -> None:
    with pytest.raises(InvalidQuestionError, match=message):
        check_question(question)


def test_question_is_stripped() -> None:
    assert check_question("  how many?  ") == "how many?"
