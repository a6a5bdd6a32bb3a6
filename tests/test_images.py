"""Image decoding for captioning: orientation, shrinking, and what is sent to a server."""

from __future__ import annotations

import io
import warnings

import pytest
from PIL import Image

from pipeline.caption.images import ImageDecodeError, bytes_to_send, decode, decode_image


def encoded(im: Image.Image, fmt: str = "JPEG", orientation: int | None = None) -> bytes:
    buf = io.BytesIO()
    kwargs = {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        kwargs["exif"] = exif.tobytes()
    im.save(buf, fmt, **kwargs)
    return buf.getvalue()


def half_red(size=(40, 20)) -> Image.Image:
    """Left half red, right half blue: a rotation shows in where the red ends up."""
    im = Image.new("RGB", size, (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, size[0] // 2, size[1]))
    return im


def test_exif_orientation_is_applied_once_at_decode():
    # Orientation 6: the camera was turned 90 degrees clockwise; upright, the image is 20 x 40
    # and its top is what was stored as the left (red) side.
    im = decode_image(encoded(half_red(), orientation=6))
    assert im.size == (20, 40) and im.mode == "RGB"
    r, g, b = im.getpixel((10, 5))
    assert r > 200 and b < 60, (r, g, b)
    r, g, b = im.getpixel((10, 35))
    assert b > 200 and r < 60, (r, g, b)
    assert decode_image(encoded(half_red(), orientation=1)).size == (40, 20)


def test_shrinks_to_max_side_and_never_enlarges():
    assert decode_image(encoded(half_red((400, 200))), max_side=100).size == (100, 50)
    assert decode_image(encoded(half_red((40, 20))), max_side=100).size == (40, 20)


def test_undecodable_bytes_name_the_problem():
    with pytest.raises(ImageDecodeError, match="no image bytes"):
        decode_image(b"")
    with pytest.raises(ImageDecodeError, match="not a recognised image format"):
        decode_image(b"<html>not found</html>")
    with pytest.raises(ImageDecodeError, match="could not be decoded"):
        decode_image(encoded(half_red((400, 200)))[:300])


@pytest.mark.parametrize("fmt,mime", [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")])
def test_unchanged_images_are_sent_as_their_original_bytes(fmt, mime):
    data = encoded(half_red(), fmt)
    assert bytes_to_send(data, decode(data, max_side=448)) == (data, mime)


@pytest.mark.parametrize("case", ["shrunk", "rotated", "rgba", "grey"])
def test_changed_images_are_sent_as_a_jpeg_of_the_decoded_pixels(case):
    data = {"shrunk": encoded(half_red((400, 200))),
            "rotated": encoded(half_red(), orientation=6),
            "rgba": encoded(half_red().convert("RGBA"), "PNG"),
            "grey": encoded(half_red().convert("L"))}[case]
    decoded = decode(data, max_side=100)
    image = decoded.image
    sent, mime = bytes_to_send(data, decoded)
    assert mime == "image/jpeg" and sent != data
    with Image.open(io.BytesIO(sent)) as back:
        assert back.format == "JPEG" and back.size == image.size and back.mode == "RGB"


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    data = bytearray(encoded(Image.new("L", (1, 1)), "PNG"))
    ihdr = struct.pack(">II", width, height) + bytes(data[24:29])  # keep depth, colour type, ...
    data[16:29] = ihdr
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return bytes(data)


def test_pil_alone_only_warns_below_twice_its_limit():
    """The premise: between MAX_IMAGE_PIXELS (89 megapixels) and twice that, PIL decodes with a warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with Image.open(io.BytesIO(png_claiming(10_000, 10_000))) as im:
            assert im.size == (10_000, 10_000)
    assert any(issubclass(w.category, Image.DecompressionBombWarning) for w in caught)


@pytest.mark.parametrize("side", [10_000, 15_000])  # PIL alone: a warning at 10,000 px square, an error at 15,000
def test_decompression_bombs_are_decode_errors(side):
    with pytest.raises(ImageDecodeError, match="too large to decode safely"):
        decode(png_claiming(side, side))
