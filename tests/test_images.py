"""Each kind of bad or unusual image: refused with a reason, or converted to what DALI decodes."""

import io

import numpy as np
import pytest
from PIL import Image

from conftest import encode
from data_shards.images import ImageError, decode_rgb, prepare_image

rng = np.random.default_rng(1)
RGB = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)


def test_plain_jpeg_and_png_are_kept_byte_for_byte():
    for fmt, ext in (("JPEG", "jpg"), ("PNG", "png")):
        data = encode(RGB, fmt)
        out = prepare_image(data)
        assert (out.data, out.ext, out.width, out.height, out.converted) == (data, ext, 30, 20, False)
    grey = encode(RGB[..., 0], "JPEG")
    assert prepare_image(grey).data == grey


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "zero-byte"),
        (b"this is a text file with a .jpg name\n", "not an image"),
        (encode(RGB, "JPEG")[:-200], "does not decode"),
        (encode(RGB, "PNG")[:60], "does not decode"),
    ],
    ids=["zero-byte", "text", "truncated-jpeg", "truncated-png"],
)
def test_unusable_files_are_refused_with_a_reason(data, reason):
    with pytest.raises(ImageError, match=reason):
        prepare_image(data)


def test_oversized_image_is_refused_before_decoding():
    with pytest.raises(ImageError, match="over the limit"):
        prepare_image(encode(RGB, "PNG"), max_pixels=599)
    assert not prepare_image(encode(RGB, "PNG"), max_pixels=600).converted


def test_decompression_bomb_header_is_refused():
    # A PNG claiming 100k x 100k pixels: Pillow's own guard trips before our limit is consulted.
    bomb = encode(np.zeros((1, 1), np.uint8), "PNG")
    bomb = bomb[:16] + (100_000).to_bytes(4, "big") * 2 + bomb[24:]
    with pytest.raises(ImageError):
        prepare_image(bomb, max_pixels=10**12)


def test_cmyk_jpeg_becomes_rgb_jpeg():
    buf = io.BytesIO()
    Image.fromarray(RGB).convert("CMYK").save(buf, "JPEG", quality=95)
    out = prepare_image(buf.getvalue())
    assert out.converted and out.ext == "jpg"
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.mode == "RGB" and im.size == (30, 20)


def test_rgba_png_is_composited_on_white():
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 0] = 255  # red
    rgba[:2, :, 3] = 255  # top half opaque, bottom half transparent
    out = prepare_image(encode(rgba, "PNG"))
    assert out.converted and out.ext == "png"
    pixels = decode_rgb(out.data)
    assert (pixels[:2] == [255, 0, 0]).all() and (pixels[2:] == [255, 255, 255]).all()


def test_16_bit_png_is_scaled_to_8_bit():
    deep = np.array([[0, 257 * 100, 65535]], np.uint16)
    out = prepare_image(encode(deep, "PNG"))
    assert out.converted and out.ext == "png"
    with Image.open(io.BytesIO(out.data)) as im:
        assert im.mode == "L"
        assert np.asarray(im).tolist() == [[0, 100, 255]]


@pytest.mark.parametrize("fmt", ["WEBP", "TIFF", "BMP", "GIF"])
def test_other_formats_become_png(fmt):
    out = prepare_image(encode(RGB, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert out.converted and out.ext == "png"
    if fmt in ("WEBP", "TIFF", "BMP"):
        assert (decode_rgb(out.data) == RGB).all()


def test_palette_png_becomes_rgb_png():
    pal = Image.fromarray(RGB).convert("P")
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    out = prepare_image(buf.getvalue())
    assert out.converted and (decode_rgb(out.data) == np.asarray(pal.convert("RGB"))).all()


def test_max_side_downscales_keeping_aspect():
    out = prepare_image(encode(RGB, "JPEG"), max_side=15)
    assert (out.width, out.height, out.ext, out.converted) == (15, 10, "jpg", True)
