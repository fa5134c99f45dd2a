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
    for source in (data, b64, f"data:image/png;base64,{b64}", path, Image.open(io.BytesIO(data))):
        image = load_image(source)
        assert image.size == (64, 48) and image.mode == "RGB"


def test_a_string_is_never_opened_as_a_file(tmp_path: Path) -> None:
    """Strings come from users, web clients and models' tool calls: a file is a ``Path``."""
    path = tmp_path / "x.png"
    path.write_bytes(png())
    for name in (str(path), "/etc/passwd", "/etc/hostname", "~/.bashrc"):
        with pytest.raises(InvalidImageError, match=r"base64|not a readable image"):
            load_image(name)


@pytest.mark.parametrize(
    ("source", "message"),
    [
        (b"", "empty"),
        (b"definitely not an image", "not a readable image"),
        (png()[:60], "corrupt or truncated"),
        ("", "empty"),
        ("!!not base64!!", "not valid base64"),
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


# ---------------------------------------------------------------------------------- formats
def encoded(image: Image.Image, fmt: str, **kwargs: object) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


PICTURE = Image.new("RGB", (40, 30), (200, 30, 10))
EPS = (
    b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 40 30\n%%EndComments\n"
    b"newpath 0 0 moveto 40 30 lineto stroke showpage\n%%EOF\n"
)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "MPO"])  # MPO: a camera's JPEG
def test_the_accepted_formats_load(fmt: str) -> None:
    image = load_image(encoded(PICTURE, fmt))
    assert image.size == (40, 30) and image.mode == "RGB"


@pytest.mark.parametrize(
    "data",
    [encoded(PICTURE, "TGA"), encoded(PICTURE, "PCX"), encoded(PICTURE, "TIFF"), EPS],
    ids=["tga", "pcx", "tiff", "eps"],
)
def test_other_formats_are_refused_before_decoding(data: bytes) -> None:
    """Pillow reads these (EPS through Ghostscript, where it is installed); a request may not."""
    assert Image.open(io.BytesIO(data)).format in {"TGA", "PCX", "TIFF", "EPS"}  # Pillow alone would open it
    with pytest.raises(InvalidImageError, match="PNG, JPEG, WebP, GIF or BMP"):
        load_image(data)
    with pytest.raises(InvalidImageError, match="PNG, JPEG, WebP, GIF or BMP"):
        load_image(base64.b64encode(data).decode())


def test_an_animated_gif_gives_its_first_frame() -> None:
    frames = [Image.new("RGB", (20, 20), colour) for colour in ((255, 0, 0), (0, 0, 255))]
    data = encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert Image.open(io.BytesIO(data)).n_frames == 2
    assert load_image(data).getpixel((10, 10)) == (255, 0, 0)


# ---------------------------------------------------------------------------------- downscaling
@pytest.mark.parametrize("as_pil", [False, True])
def test_a_large_upload_reaches_the_model_downscaled(as_pil: bool) -> None:
    big = Image.new("RGB", (3000, 2000), (10, 120, 240))
    image = load_image(big if as_pil else encoded(big, "PNG"))
    assert image.size == (1024, 683)  # the long side at max_image_side, the aspect kept
    assert load_image(encoded(big, "PNG"), InputLimits(max_image_side=300)).size == (300, 200)
    thin = load_image(encoded(Image.new("RGB", (4000, 9)), "PNG"))
    assert thin.size == (1024, 8)  # a thin strip keeps min_image_side rather than become a line


def test_a_demo_puzzle_is_unchanged() -> None:
    from dreamr_stream.tasks import get_task

    puzzle = get_task().item("test", 0).image
    assert puzzle.size == (112, 112)
    assert load_image(encoded(puzzle, "PNG")).tobytes() == puzzle.tobytes()
    assert load_image(puzzle).tobytes() == puzzle.tobytes()


def test_the_side_limit_is_checked_against_the_minimum() -> None:
    with pytest.raises(DreamrError, match="max_image_side cannot be below"):
        InputLimits(max_image_side=4, min_image_side=8)
