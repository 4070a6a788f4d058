"""Validate one image and bring it into a form every DALI decoder reads: 8-bit RGB or grey JPEG/PNG.

Bytes that already have that form are kept as they are; everything else is decoded once and re-encoded
(JPEG sources as JPEG, all others losslessly as PNG). An image whose EXIF orientation tag turns or mirrors
it is re-encoded upright (and without the tag): DALI honours the tag, PIL and most other readers do not, so
only pixels stored the way they are displayed look the same to every reader.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

DEFAULT_MAX_PIXELS = 100_000_000  # 10k x 10k; larger "images" are refused as decompression bombs
JPEG_QUALITY = 95
_KEEP_MODES = {"RGB", "L"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_ORIENTATION = 0x0112  # EXIF tag; 1 is upright, 2..8 mirror and/or rotate


class ImageError(ValueError):
    """The bytes are not an image we can store (the message says why)."""


@dataclass(frozen=True)
class PreparedImage:
    data: bytes
    ext: str  # "jpg" or "png"
    width: int
    height: int
    converted: bool  # False when `data` are the source bytes unchanged


def _png_is_plain(data: bytes) -> bool:
    """8-bit grey or RGB PNG (IHDR bit depth at byte 24, colour type at byte 25)."""
    return data[:8] == _PNG_SIGNATURE and len(data) > 25 and data[24] == 8 and data[25] in (0, 2)


def _orientation(im: Image.Image) -> int:
    try:
        value = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # unreadable EXIF: nothing anyone could apply
        return 1
    return value if value in range(2, 9) else 1


def _to_rgb(im: Image.Image) -> Image.Image:
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # Pillow's convert("L") clips 16-bit values; scale the range instead.
        arr = np.asarray(im, dtype=np.int64)
        peak = 65535 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255
        im = Image.fromarray((arr.clip(0, peak) * 255 // peak).astype(np.uint8), "L")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(background, rgba)
    return im.convert("RGB") if im.mode != "L" else im


def prepare_image(
    data: bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> PreparedImage:
    """Decode `data` fully (to catch truncation), then keep or convert it. Raises ImageError."""
    if not data:
        raise ImageError("zero-byte file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                width, height = im.size
                if width * height > max_pixels:
                    raise ImageError(f"{width}x{height} pixels is over the limit of {max_pixels}")
                im.load()
                fmt = im.format
                plain = (fmt == "JPEG" and im.mode in _KEEP_MODES) or (fmt == "PNG" and _png_is_plain(data))
                plain = plain and _orientation(im) == 1
                too_big = max_side is not None and max(width, height) > max_side
                if plain and not too_big:
                    return PreparedImage(data, "jpg" if fmt == "JPEG" else "png", width, height, False)
                out = _to_rgb(im)
    except ImageError:
        raise
    except Image.DecompressionBombError as e:
        raise ImageError(f"refused as a decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ImageError("not an image (no decoder recognises it)") from None
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageError(f"does not decode: {e}") from None
    if max_side is not None and max(out.size) > max_side:
        scale = max_side / max(out.size)
        size = (max(1, round(out.width * scale)), max(1, round(out.height * scale)))
        out = out.resize(size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    if fmt == "JPEG":
        out.save(buf, "JPEG", quality=JPEG_QUALITY)
        ext = "jpg"
    else:
        out.save(buf, "PNG")
        ext = "png"
    return PreparedImage(buf.getvalue(), ext, out.width, out.height, True)


def decode_rgb(data: bytes) -> np.ndarray:
    """Reference decode (HWC uint8 RGB) used by verification and tests."""
    with Image.open(io.BytesIO(data)) as im:
        return np.asarray(im.convert("RGB"))
