"""Decode one image file into a uint8 RGB array, or say in one line why it cannot be used.

Users' folders hold whatever cameras, phones and scrapers wrote; a single odd file must cost that
file, never the run. So every failure of one file becomes an UnreadableImage with a short reason.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError


SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


class UnreadableImage(Exception):
    """One file that is not a usable image; str() is the reason, one line."""


@contextlib.contextmanager
def own_pixel_limit() -> Iterator[None]:
    """Switch off PIL's global decompression-bomb check while we apply our own limit, then restore it.

    PIL's check raises or warns inside Image.open with its own threshold; ours (max_image_pixels)
    may be higher or lower, and must not leak into the rest of the process."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _check_pixels(im: Image.Image, max_pixels: int) -> None:
    pixels = im.size[0] * im.size[1]
    if max_pixels and pixels > max_pixels:
        raise UnreadableImage(f"{pixels} pixels over max_image_pixels={max_pixels}")


def _to_rgb(im: Image.Image) -> Image.Image:
    # PIL's own 16-bit -> RGB conversion clips at 255, so a 16-bit PNG would come out nearly white.
    if im.mode in SIXTEEN_BIT_MODES:
        im = Image.fromarray((np.asarray(im).astype(np.uint16) >> 8).astype(np.uint8), "L")
    return im.convert("RGB")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, UnidentifiedImageError):
        return "not an image format PIL can read"  # PIL's message names a memory address
    text = " ".join(str(exc).split()) or "no details"
    return f"{type(exc).__name__}: {text}"


def decode_image(data: bytes, image_size: int, max_pixels: int) -> np.ndarray:
    """(image_size, image_size, 3) uint8 from encoded bytes; raises UnreadableImage with the reason.

    Call inside own_pixel_limit(). The size check runs after Image.open has read only the header,
    so a file over the limit is never decoded."""
    if not data:
        raise UnreadableImage("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:
                _check_pixels(im, max_pixels)
                rgb = _to_rgb(im)
                if rgb.size != (image_size, image_size):
                    rgb = rgb.resize((image_size, image_size), Image.BILINEAR)
                return np.asarray(rgb, dtype=np.uint8)
    except UnreadableImage:
        raise
    # One file's decoder can raise nearly anything (PIL plugins raise SyntaxError, struct.error,
    # IndexError, ZeroDivisionError...); every such failure costs that file only.
    except Exception as exc:  # noqa: BLE001
        raise UnreadableImage(_describe(exc)) from exc
