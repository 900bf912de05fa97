"""The bad-input corpus: every way a file can be bad gets a message naming it; unusual modes convert as documented."""

import io

import numpy as np
import pytest
from PIL import Image

from synaug.data.images import BadImageError, load_image


def _bytes(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


@pytest.fixture
def jpeg() -> bytes:
    rng = np.random.default_rng(0)
    return _bytes(Image.fromarray(rng.integers(0, 255, (64, 64), dtype=np.uint8)), "JPEG")


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda j: b"", "empty file"),
        (lambda j: j[: len(j) // 2], "truncated or corrupt"),
        (lambda j: b"this is a text file, not a JPEG\n" * 20, "not an image"),
    ],
    ids=["zero-byte", "truncated", "not-an-image"],
)
def test_bad_file_messages_name_the_file(tmp_path, jpeg, make, message):
    path = tmp_path / "scan_017.jpg"
    path.write_bytes(make(jpeg))
    with pytest.raises(BadImageError, match=message) as err:
        load_image(path, 32, 1)
    assert "scan_017.jpg" in str(err.value)


def test_decompression_bomb_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "bomb.png"
    Image.new("L", (200, 200)).save(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10_000)  # 40,000 pixels is a bomb under this limit
    with pytest.raises(BadImageError, match="decompression bomb") as err:
        load_image(path, 32, 1)
    assert "bomb.png" in str(err.value)


def test_rgba_alpha_is_composited_on_black():
    a = np.zeros((8, 8, 4), dtype=np.uint8)
    a[..., :3] = 200
    a[:4, :, 3] = 255  # top half opaque, bottom half transparent
    x = load_image(_bytes(Image.fromarray(a, "RGBA"), "PNG"), 8, 3)
    assert x.shape == (3, 8, 8)
    assert (x[:, :4] == 200).all() and (x[:, 4:] == 0).all()


def test_palette_image_keeps_its_colours():
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    img.putpixel((0, 0), 1)
    x = load_image(_bytes(img, "PNG"), 8, 3)
    assert tuple(x[:, 0, 0]) == (255, 0, 0) and tuple(x[:, 1, 1]) == (0, 0, 0)


def test_16bit_png_is_windowed_to_its_range():
    a = np.linspace(1000, 4000, 64, dtype=np.uint16).reshape(8, 8)  # a 12-bit scanner range in 16 bits
    x = load_image(_bytes(Image.fromarray(a), "PNG"), 8, 1)
    assert x.dtype == np.uint8 and x.min() == 0 and x.max() == 255
    assert (np.diff(x.ravel().astype(int)) >= 0).all()  # order preserved


def test_cmyk_jpeg_loads_as_rgb_and_grey():
    img = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    data = _bytes(img, "JPEG")
    rgb = load_image(data, 16, 3)
    assert rgb.shape == (3, 16, 16) and rgb[0].mean() > 200 and rgb[1].mean() < 60
    assert load_image(data, 16, 1).shape == (1, 16, 16)


def test_one_hot_pixel_does_not_black_out_a_16bit_image():
    # A 12-bit anatomy (1000..4000) with one saturated detector pixel: a min-max window would map the whole
    # anatomy to about 4% of the grey range; the percentile window keeps it spread over 0..255.
    a = np.linspace(1000, 4000, 64 * 64).reshape(64, 64).astype(np.uint16)
    a[0, 0] = 65535
    x = load_image(_bytes(Image.fromarray(a), "PNG"), 64, 1)
    assert x[0, 0, 0] == 255  # clipped, not the window's maximum
    assert x.mean() > 100 and np.percentile(x, 90) > 200
