"""Reading one image safely: every way a file can be bad gets a message naming it, and every valid but
unusual mode gets one documented conversion.

Conversions (to 8-bit grey `L` or `RGB`):
- RGBA / LA: alpha is dropped after compositing on black (medical images have a black background).
- palette (`P`), CMYK, YCbCr, 1-bit: PIL's own conversion to RGB.
- 16-bit and 32-bit integer or float (`I;16`, `I`, `F`): windowed to the image's own 0.5th-99.5th percentile
  range (`WINDOW`), values outside clipped, as viewers' auto-window does without a preset: a robust window,
  so that a few hot or dead pixels (a marker, a saturated detector pixel) do not squeeze the anatomy into
  one grey level; a constant image becomes black.
Errors (`BadImageError`): missing or unreadable file, zero-byte file, content that is no image format, truncated or corrupt data,
decompression bomb (more than `PIL.Image.MAX_IMAGE_PIXELS` pixels).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

WINDOW = (0.5, 99.5)  # percentiles of a high-bit-depth image mapped to 0 and 255
IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".gif", ".pgm", ".ppm"}


class BadImageError(ValueError):
    """An input image that cannot be used; the message names the file and what is wrong with it."""


def open_image(source: str | Path | bytes, name: str | None = None) -> Image.Image:
    """Decode fully (truncation shows only on decode) and return the PIL image in its stored mode."""
    name = name or str(source)
    try:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
    except FileNotFoundError:
        raise BadImageError(f"{name}: listed but not on disk (missing file)") from None
    except (IsADirectoryError, PermissionError) as err:
        raise BadImageError(f"{name}: cannot be read ({err.strerror})") from None
    if not data:
        raise BadImageError(f"{name}: empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            # PIL only warns between MAX_IMAGE_PIXELS and twice that; a bomb is a bomb either way.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            img.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise BadImageError(f"{name}: decompression bomb refused ({err})") from None
    except UnidentifiedImageError:
        raise BadImageError(f"{name}: not an image (content is no known image format)") from None
    except (OSError, SyntaxError, ValueError) as err:
        raise BadImageError(f"{name}: truncated or corrupt image data ({err})") from None
    return img


def to_mode(img: Image.Image, channels: int) -> Image.Image:
    """Convert to 8-bit grey (channels=1) or RGB (channels=3) by the rules in the module docstring."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        lo, hi = np.percentile(a, WINDOW)
        a = (a.clip(lo, hi) - lo) / (hi - lo) * 255 if hi > lo else np.zeros_like(a)
        img = Image.fromarray(a.round().astype(np.uint8), "L")
    elif img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGB", rgba.size)
        img.paste(rgba, mask=rgba.getchannel("A"))
    return img.convert("L" if channels == 1 else "RGB")


def load_image(source: str | Path | bytes, size: int, channels: int, name: str | None = None) -> np.ndarray:
    """Decode, convert and resize to (channels, size, size) uint8."""
    img = to_mode(open_image(source, name), channels)
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    a = np.asarray(img, dtype=np.uint8)
    return a[None] if channels == 1 else a.transpose(2, 0, 1)
