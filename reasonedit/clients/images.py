"""Images on the wire: PNG bytes, base64 text and data URLs, as edit services and chat APIs take them."""

from __future__ import annotations

import base64
import binascii
import io
from typing import Union

import numpy as np
from PIL import Image as PILImage


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W, 3|4) array as PNG bytes; callers check the shape they accept."""
    buf = io.BytesIO()
    PILImage.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def png_base64(image: np.ndarray) -> str:
    """A uint8 (H, W, 3) array as base64 PNG text."""
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image: expected a uint8 (H, W, 3) RGB array, got {image.dtype} {image.shape}")
    return base64.b64encode(png_bytes(image)).decode("ascii")


def image_mime(data: bytes) -> str:
    """The MIME type of encoded image bytes chat APIs take as they are; ValueError for any other."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "image/png"
    if data[:3] == b"\xff\xd8\xff":
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    raise ValueError("not a PNG, JPEG, WebP or GIF file")


def data_url(image: Union[np.ndarray, PILImage.Image, bytes]) -> str:
    """An image as a `data:<mime>;base64,...` URL, as chat APIs take images: encoded bytes (PNG, JPEG, WebP,
    GIF) go as they are, an array or PIL image as PNG."""
    if isinstance(image, bytes):
        return f"data:{image_mime(image)};base64,{base64.b64encode(image).decode('ascii')}"
    if isinstance(image, PILImage.Image):
        image = np.asarray(image.convert("RGB"))
    return "data:image/png;base64," + png_base64(image)


def decode_image_bytes(raw: bytes, what: str = "image") -> np.ndarray:
    """Encoded image bytes (PNG, JPEG, WebP...) to a uint8 (H, W, 3) array; ValueError naming `what`."""
    try:
        with PILImage.open(io.BytesIO(raw)) as im:
            im.load()
            return np.array(im.convert("RGB"))  # writable: torch warns on read-only arrays
    except (PILImage.UnidentifiedImageError, OSError, ValueError) as e:
        raise ValueError(f"{what}: not a readable image ({type(e).__name__}: {e})") from None


def decode_base64(text: str) -> bytes:
    """Base64 text, or a data URL, to bytes; ValueError saying what is wrong."""
    if text.startswith("data:"):
        text = text.split(",", 1)[1] if "," in text else ""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ValueError(f"not valid base64 ({e})") from None


def decode_base64_image(text: str, what: str = "image") -> np.ndarray:
    """Base64 (or a data URL) to a uint8 (H, W, 3) array; ValueError naming `what` on bad base64 or bytes."""
    try:
        raw = decode_base64(text)
    except ValueError as e:
        raise ValueError(f"{what}: {e}") from None
    return decode_image_bytes(raw, what)


__all__ = ["data_url", "decode_base64", "decode_base64_image", "decode_image_bytes", "image_mime", "png_base64",
           "png_bytes"]
