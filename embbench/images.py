"""Decode any image file to an 8-bit RGB ``PIL.Image``, or say exactly why it cannot be decoded.

Every image that reaches a model goes through :func:`load_rgb`. It handles the modes public and
marketplace datasets actually contain (grayscale, CMYK JPEGs, palette images with a transparent
colour, LA/RGBA with alpha, 16-bit PNG/TIFF, EXIF-rotated phone photos) and turns every failure
(missing, zero-byte, truncated, non-image, decompression-bomb files) into a
:class:`BadImageError` that names the file and the reason, so a loader can skip the image and
report it instead of dying or silently dropping it.

Conversions:

| source mode            | result                                                             |
|------------------------|--------------------------------------------------------------------|
| ``1``, ``L``           | gray replicated to R, G, B                                         |
| ``P`` (+ transparency) | palette expanded; transparent pixels composited on white           |
| ``LA``, ``RGBA``, ``PA``| alpha composited on a white background                             |
| ``CMYK``               | Pillow's CMYK->RGB (Adobe-inverted JPEGs are handled by Pillow)     |
| ``I;16*``, ``I``       | 16-bit range scaled to 8 bits (``v * 255 / 65535``, not clipped)   |
| ``F``                  | ``[0, 1]`` scaled to ``[0, 255]``; other ranges clipped            |
| EXIF orientation 2-8   | pixels rotated/flipped upright (``ImageOps.exif_transpose``)       |
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from embbench._errors import UserError

logger = logging.getLogger(__name__)

#: Images with more pixels than this are refused as decompression bombs (Pillow's own limit;
#: a 9,000 x 9,000 product photo is still accepted).
DEFAULT_MAX_PIXELS = 89_478_485

_WHITE = (255, 255, 255)


class BadImageError(UserError):
    """An image file that cannot be decoded; ``path`` and ``reason`` say which and why.

    Args:
        path: The file.
        reason: Short human-readable reason (e.g. ``"truncated file: image file is truncated"``).
    """

    def __init__(self, path: str | os.PathLike[str], reason: str) -> None:
        self.path = str(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")

    def __reduce__(self) -> tuple:  # picklable across DataLoader worker processes
        return (self.__class__, (self.path, self.reason))


def _target_pixels(target_size: int | tuple[int, int] | None) -> tuple[int, int] | None:
    """The (w, h) request for ``Image.draft``: square, so it holds for either orientation."""
    if target_size is None:
        return None
    side = max(target_size) if isinstance(target_size, tuple | list) else int(target_size)
    return (max(1, side), max(1, side))


def _sixteen_bit_to_rgb(im: Image.Image) -> Image.Image:
    """Scale an integer (``I;16*``/``I``) or float (``F``) image to 8-bit RGB."""
    arr = np.asarray(im)
    if im.mode == "F":
        arr = arr.astype(np.float64)
        finite = arr[np.isfinite(arr)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            arr = arr * 255.0
        out = np.clip(np.nan_to_num(arr), 0, 255).round().astype(np.uint8)
    else:
        arr = arr.astype(np.int64)
        hi = int(arr.max()) if arr.size else 0
        if im.mode.startswith("I;16") or 255 < hi <= 65535:
            out = (np.clip(arr, 0, 65535) * 255 + 32767) // 65535
        elif hi <= 255:
            out = np.clip(arr, 0, 255)
        else:  # 32-bit data beyond 16 bits: stretch its own range
            lo = int(arr.min())
            out = (arr - lo) * 255 // max(1, hi - lo)
        out = out.astype(np.uint8)
    return Image.fromarray(out, mode="L").convert("RGB")


def _composite_on_white(im: Image.Image) -> Image.Image:
    """Flatten an image with an alpha channel onto a white background."""
    rgba = im.convert("RGBA")
    background = Image.new("RGB", rgba.size, _WHITE)
    background.paste(rgba, mask=rgba.getchannel("A"))
    return background


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert a decoded image of any mode to 8-bit RGB (see the module table).

    Args:
        im: A loaded Pillow image.

    Returns:
        An ``RGB`` image (``im`` itself when it already is one without transparency).
    """
    mode = im.mode
    if mode == "RGB" and "transparency" not in im.info:
        return im
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        return _composite_on_white(im)
    if mode in ("P", "L", "RGB", "1") and "transparency" in im.info:
        return _composite_on_white(im)
    if mode.startswith("I") or mode == "F":
        return _sixteen_bit_to_rgb(im)
    return im.convert("RGB")


def _os_error_reason(err: OSError, default: str) -> str:
    """``truncated file: ...`` for Pillow's truncation errors, else ``<default>: ...``."""
    text = str(err)
    low = text.lower()
    kind = "truncated file" if "truncated" in low or "broken data" in low else default
    return f"{kind}: {text}"


def _open_checked(path: Path, max_pixels: int | None) -> Image.Image:
    """Open ``path`` lazily (header only) and apply the size checks; raise BadImageError."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise BadImageError(path, "file not found") from None
    except OSError as err:
        raise BadImageError(path, f"cannot read file: {err}") from None
    if path.is_dir():
        raise BadImageError(path, "is a folder, not an image file")
    if size == 0:
        raise BadImageError(path, "empty file (0 bytes)")
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        raise BadImageError(path, f"not an image (unrecognised format, {size} bytes)") from None
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"decompression bomb: {err}") from None
    except OSError as err:
        raise BadImageError(path, _os_error_reason(err, "cannot open")) from None
    except (SyntaxError, ValueError, EOFError) as err:
        raise BadImageError(path, f"cannot open: {type(err).__name__}: {err}") from None
    pixels = im.width * im.height
    if max_pixels is not None and pixels > max_pixels:
        im.close()
        raise BadImageError(
            path,
            f"decompression bomb: {im.width}x{im.height} = {pixels:,} pixels exceeds the limit "
            f"of {max_pixels:,} (raise max_pixels if this image is genuine)",
        )
    return im


def _exif_upright(im: Image.Image, path: Path) -> None:
    """Rotate ``im`` in place by its EXIF orientation; a corrupt EXIF block is ignored."""
    try:
        ImageOps.exif_transpose(im, in_place=True)
    except (SyntaxError, ValueError, TypeError, KeyError, IndexError, OSError) as err:
        logger.debug(
            "%s: EXIF orientation unreadable (%s); using the stored orientation", path, err
        )


def load_rgb(
    path: str | os.PathLike[str],
    *,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    target_size: int | tuple[int, int] | None = None,
) -> Image.Image:
    """Decode an image file to an upright 8-bit RGB image.

    Args:
        path: The image file.
        max_pixels: Refuse images with more pixels than this (decompression bombs); ``None``
            disables the check (Pillow's own 2x limit still applies).
        target_size: The smallest side (or ``(w, h)``) the caller will resize to. JPEGs are
            then decoded at 1/2, 1/4 or 1/8 scale when both sides stay at least this large
            (``Image.draft``), which is several times faster for large photos. The image is
            not resized to ``target_size``; the caller's transform does that.

    Returns:
        The image in mode ``RGB``, fully loaded (the file is closed).

    Raises:
        BadImageError: The file is missing, empty, truncated, not an image, or too large.
    """
    path = Path(path)
    im = _open_checked(path, max_pixels)
    try:
        with im:
            request = _target_pixels(target_size)
            if request is not None and im.format == "JPEG":
                im.draft("RGB", request)
            im.load()
            _exif_upright(im, path)
            out = to_rgb(im)  # leaving the block closes the file; loaded pixels stay valid
    except BadImageError:
        raise
    except Image.DecompressionBombError as err:
        raise BadImageError(path, f"decompression bomb: {err}") from None
    except OSError as err:
        raise BadImageError(path, _os_error_reason(err, "corrupt")) from None
    except (SyntaxError, ValueError, EOFError, IndexError, KeyError, TypeError) as err:
        raise BadImageError(path, f"corrupt: {type(err).__name__}: {err}") from None
    except MemoryError:
        raise BadImageError(path, "out of memory while decoding") from None
    return out


def check_image(
    path: str | os.PathLike[str], *, max_pixels: int | None = DEFAULT_MAX_PIXELS
) -> str | None:
    """Decode ``path`` fully (at reduced JPEG scale) and return why it is bad, or ``None``.

    Used by dataset verification: a truncated JPEG is only detected by decoding it, so this
    decodes every pixel row, at 1/8 scale for JPEGs to keep it fast.

    Args:
        path: The image file.
        max_pixels: As in :func:`load_rgb`.

    Returns:
        ``None`` when the image decodes, otherwise the reason.
    """
    try:
        load_rgb(path, max_pixels=max_pixels, target_size=1)
    except BadImageError as err:
        return err.reason
    return None


def is_truncation_tolerant() -> bool:
    """Whether Pillow was globally set to accept truncated images (someone set the flag).

    ``ImageFile.LOAD_TRUNCATED_IMAGES = True`` makes Pillow fill missing rows with gray instead
    of failing; embbench never sets it, but another library might, so verify reports it.
    """
    return bool(ImageFile.LOAD_TRUNCATED_IMAGES)
