"""Reading the image files a benchmark names, in one place that refuses what is not an image, is truncated,
or holds more pixels than a limit (a decompression bomb: a small file that decodes to gigabytes).

`check_image(path, max_pixels)` reads the header only (format and size); `read_rgb(path, max_pixels)` and
`decoded_format(...)` decode the whole image after the same check. All raise `BadImageError` naming the file
and what is wrong with it; the runner turns that into a failed sample, never a failed run.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

# 40 megapixels: more than any photo in GEdit, ImgEdit, KRIS or RISE (~1-4 MP), ~120 MB once decoded as RGB
DEFAULT_MAX_PIXELS = 40_000_000


class BadImageError(ValueError):
    """An image file that cannot be used: not an image, truncated or damaged, or too many pixels."""


def _open(source: str | os.PathLike | bytes, what: str, max_pixels: int):
    """The opened PIL image (header read, pixels not decoded yet) after the pixel-count check."""
    from PIL import Image, UnidentifiedImageError
    try:
        im = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    except UnidentifiedImageError:
        raise BadImageError(f"{what}: not an image file") from None
    except Image.DecompressionBombError as e:  # over PIL's own limit, which may be below ours
        raise BadImageError(f"{what}: {e}") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise BadImageError(f"{what}: cannot read it as an image ({e})") from None
    width, height = im.size
    if width * height > max_pixels:
        im.close()
        raise BadImageError(f"{what}: {width}x{height} = {width * height:,} pixels, over the limit of "
                            f"{max_pixels:,} (a decompression bomb?); raise the limit with --max-pixels if it is real")
    return im


def check_image(path: str | os.PathLike, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """(width, height) of an image file, from its header; BadImageError when it is not one or is too large."""
    with _open(path, str(path), max_pixels) as im:
        return im.size


def _decoded(source: str | os.PathLike | bytes, max_pixels: int, what: str | None, use):
    """`use(image)` of the fully decoded image after the header check; BadImageError naming `what` otherwise."""
    from PIL import Image
    what = what or (f"{len(source)} image bytes" if isinstance(source, bytes) else str(Path(source)))
    with _open(source, what, max_pixels) as im:
        try:
            im.load()
            return use(im)
        except Image.DecompressionBombError as e:
            raise BadImageError(f"{what}: {e}") from None
        except (OSError, SyntaxError, ValueError) as e:  # PIL: "image file is truncated", broken chunks, ...
            raise BadImageError(f"{what}: truncated or damaged image ({e})") from None


def decoded_format(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
                   what: str | None = None) -> str:
    """The format ("PNG", "JPEG", ...) of an image, after decoding all of it; BadImageError naming it otherwise."""
    return _decoded(source, max_pixels, what, lambda im: im.format or "PNG")


def read_rgb(source: str | os.PathLike | bytes, max_pixels: int = DEFAULT_MAX_PIXELS,
             what: str | None = None) -> np.ndarray:
    """An image file (or encoded bytes) decoded as a uint8 (H, W, 3) array; BadImageError naming it otherwise."""
    return _decoded(source, max_pixels, what, lambda im: np.asarray(im.convert("RGB"), dtype=np.uint8).copy())


__all__ = ["BadImageError", "DEFAULT_MAX_PIXELS", "check_image", "decoded_format", "read_rgb"]
