"""Turn whatever a user hands us (PIL image, path, bytes, numpy array) into an RGB ``PIL.Image``, or refuse clearly."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Images with more pixels than this are refused before decoding (decompression-bomb guard). 64 MP covers any photo.
MAX_PIXELS = 64_000_000

ImageLike = Any  # PIL.Image.Image | str | os.PathLike | bytes | numpy.ndarray


def _check_pixels(width: int, height: int, what: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise ValueError(f"{what}: image has zero size ({width}x{height})")
    if width * height > max_pixels:
        raise ValueError(
            f"{what}: image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} "
            "(possible decompression bomb); resize it first"
        )


def _to_8bit(img: Image.Image) -> Image.Image:
    """Scale 16/32-bit integer and float images to 8 bits; PIL's own convert('RGB') would clip them."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        elif img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            lo, hi = 0.0, 1.0
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo)
        return Image.fromarray((scaled * 255.0).round().astype(np.uint8), mode="L")
    return img


def _to_rgb(img: Image.Image) -> Image.Image:
    img = _to_8bit(img)
    if img.mode == "La":
        # Pillow converts premultiplied grey+alpha to LA only (found by tests/test_fuzz_generate.py): un-premultiply.
        img = img.convert("LA")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # Transparent pixels have undefined colour: composite on white, as a viewer would show them.
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def _from_array(arr: np.ndarray, max_pixels: int) -> Image.Image:
    if arr.size == 0:
        raise ValueError(f"image array has zero size (shape {arr.shape})")
    if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
        arr = np.moveaxis(arr, 0, -1)  # CHW -> HWC
    if arr.ndim == 3 and arr.shape[-1] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise ValueError(
            f"image array must be HxW, HxWx3 or HxWx4 (channels last), got shape {arr.shape} (rank {arr.ndim})"
        )
    _check_pixels(arr.shape[1], arr.shape[0], "image array", max_pixels)
    if np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError("image array contains NaN or inf")
        if arr.min() < 0.0 or arr.max() > 1.0:
            raise ValueError(
                f"float image array must hold values in [0, 1], got [{arr.min():.3g}, {arr.max():.3g}]; "
                "pass uint8 for 0-255 data"
            )
        arr = (arr * 255.0).round().astype(np.uint8)
    elif arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype != np.uint8:
        if not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"image array has unsupported dtype {arr.dtype}")
        # Scale as PIL scales the same image read from a file: 16-bit unsigned by its full range (mode I;16),
        # other integers (mode I) by their own min..max.
        lo, hi = (0.0, 65535.0) if arr.dtype == np.uint16 else (float(arr.min()), float(arr.max()))
        scaled = np.zeros(arr.shape) if hi <= lo else (arr.astype(np.float64) - lo) / (hi - lo)
        arr = (scaled * 255.0).round().astype(np.uint8)
    return _to_rgb(Image.fromarray(np.ascontiguousarray(arr)))


def _open(fp: Any, what: str, max_pixels: int) -> Image.Image:
    try:
        img = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ValueError(f"{what}: {e}") from e
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, AttributeError) as e:
        # Pillow refuses an unknown format with UnidentifiedImageError, but a known signature followed by junk fails
        # inside the format's parser: OSError ("Truncated File Read"), ValueError ("Truncated IHDR chunk"), even
        # AttributeError (PngStream has no handler for a junk chunk name). All mean the same to the caller.
        raise ValueError(f"{what}: not a readable image file ({type(e).__name__}: {e})") from e
    _check_pixels(img.width, img.height, what, max_pixels)
    try:
        if getattr(img, "n_frames", 1) > 1:
            img.seek(0)  # animated GIF/WebP/APNG: the first frame
        img.load()
        img = ImageOps.exif_transpose(img)  # a phone photo shows the way its EXIF says
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"{what}: image data is corrupt or truncated ({e})") from e
    return img


def bound_aspect(img: Image.Image, side: int, max_ratio: float = 20.0) -> Image.Image:
    """Keep preprocessing cost bounded for extremely elongated images; leave all others to the tower's processor.

    A tower's processor scales the *short* side to its input size, so a 20000x1 strip (a few bytes as PNG) would
    become a 224 x 4.5M-pixel array. Images more elongated than ``max_ratio`` are shrunk to fit ``2 * side`` and padded
    to a square with their mean colour (LLaVA's expand-to-square); anything up to ``max_ratio``:1 is returned as is.
    """
    w, h = img.size
    if max(w, h) <= max_ratio * min(w, h):
        return img
    img = img.copy()
    img.thumbnail((2 * side, 2 * side))
    w, h = img.size
    mean = tuple(int(c) for c in np.asarray(img).reshape(-1, 3).mean(0))
    square = Image.new("RGB", (max(w, h), max(w, h)), mean)
    square.paste(img, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
    return square


def load_image(image: ImageLike, max_pixels: int = MAX_PIXELS) -> Image.Image:
    """Load an image as RGB.

    Args:
        image: A ``PIL.Image``, a file path, raw encoded bytes, or a numpy array (HxW, HxWx3/4 uint8, or float in [0, 1]).
        max_pixels: Refuse images with more pixels than this (decompression-bomb guard).

    Returns:
        An RGB ``PIL.Image`` (EXIF rotation applied; first frame of an animation; transparency composited on white).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: the data is not a decodable image, has zero size, or is over ``max_pixels``.
        TypeError: the object is none of the accepted kinds.
    """
    if isinstance(image, Image.Image):
        _check_pixels(image.width, image.height, "image", max_pixels)
        if getattr(image, "n_frames", 1) > 1:
            image.seek(0)
        return _to_rgb(image)
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        return _to_rgb(_open(path, str(path), max_pixels))
    if isinstance(image, (bytes, bytearray, memoryview)):
        if len(image) == 0:
            raise ValueError("image bytes are empty")
        return _to_rgb(_open(io.BytesIO(bytes(image)), "image bytes", max_pixels))
    if isinstance(image, np.ndarray):
        return _from_array(image, max_pixels)
    raise TypeError(
        f"image must be a PIL.Image, a path, bytes or a numpy array, got {type(image).__module__}.{type(image).__name__}"
    )
