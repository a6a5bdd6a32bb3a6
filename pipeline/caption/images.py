"""Image decoding for captioning: bytes from a shard to an RGB image the engine can take."""

from __future__ import annotations

import io
from dataclasses import dataclass

from PIL import Image, ImageOps, UnidentifiedImageError

EXIF_ORIENTATION = 0x0112


class ImageDecodeError(ValueError):
    """The sample's image bytes are not a usable image (the message says why)."""


@dataclass
class Decoded:
    """A decoded image; `original_format` is the file's format when `image` holds the file's own
    pixels untouched (RGB, upright, not shrunk), else None."""

    image: Image.Image
    original_format: str | None = None


def decode(data: bytes, max_side: int = 0) -> Decoded:
    """Decode, turn upright (EXIF orientation), convert to RGB, and shrink (never enlarge) so the
    long side is at most `max_side`; say whether any of that changed the file's pixels.

    Orientation is applied once here, so that engines can be given the pixels as they are (vLLM
    would otherwise check and copy the image for every prompt of it). Shrinking here, on a CPU
    worker, saves the engine's processor from resizing very large images on its critical path;
    captioners resize or tile to their own sizes anyway.
    """
    if not data:
        raise ImageDecodeError("image could not be decoded: no image bytes")
    try:
        # No `with`: the image is returned as is when it is RGB already (most web images: no copy
        # of its pixels), and closing it would free them. It reads from memory, so nothing leaks.
        im = Image.open(io.BytesIO(data))
        # Web images can be decompression bombs (a few KB whose header claims 15000 x 15000
        # pixels). PIL only warns between its MAX_IMAGE_PIXELS (89 megapixels) and twice that;
        # here the header alone refuses them, before gigabytes of pixels are allocated.
        if im.width * im.height > Image.MAX_IMAGE_PIXELS:
            raise Image.DecompressionBombError(f"{im.width} x {im.height} pixels, over {Image.MAX_IMAGE_PIXELS}")
        im.load()
        untouched = im.mode == "RGB"
        try:  # phone photos: pixels as the camera was held. A broken EXIF block loses only this.
            if im.getexif().get(EXIF_ORIENTATION, 1) in range(2, 9):
                ImageOps.exif_transpose(im, in_place=True)
                untouched = False
        except Exception:  # noqa: BLE001 (PIL raises many types from EXIF parsing)
            untouched = False  # in doubt, nobody else should be trusted to read it the same way
        rgb = im if im.mode == "RGB" else im.convert("RGB")
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large to decode safely ({e})") from None
    except UnidentifiedImageError:
        # PIL's message names the BytesIO object's address: keep errors reproducible instead.
        raise ImageDecodeError("image could not be decoded: not a recognised image format") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageDecodeError(f"image could not be decoded: {e}") from None
    if rgb.width < 1 or rgb.height < 1:
        raise ImageDecodeError("image could not be decoded: empty image")
    if max_side and max(rgb.size) > max_side:
        rgb.thumbnail((max_side, max_side), Image.Resampling.BICUBIC)
        untouched = False
    return Decoded(rgb, im.format if untouched else None)


def decode_image(data: bytes, max_side: int = 0) -> Image.Image:
    """`decode`'s image alone."""
    return decode(data, max_side).image


def encode_jpeg(image: Image.Image, quality: int = 92) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


# Formats every OpenAI-compatible image endpoint we know of accepts as a data URL.
SENDABLE = {"JPEG": "image/jpeg", "PNG": "image/png", "WEBP": "image/webp"}


def bytes_to_send(data: bytes, decoded: Decoded) -> tuple[bytes, str]:
    """The image as bytes for a server: its original bytes when they decode to exactly
    `decoded.image` in a common format, else that image encoded as JPEG.

    Sending the original saves a JPEG encode per image and a second lossy compression, so that a
    server sees the very pixels a local engine would.
    """
    if decoded.original_format in SENDABLE:
        return data, SENDABLE[decoded.original_format]
    return encode_jpeg(decoded.image), "image/jpeg"
