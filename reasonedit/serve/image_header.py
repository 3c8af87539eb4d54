"""An encoded image's format and size, read from its first bytes before any decoder sees them: the edit
service decodes PNG, JPEG and WebP only, and only within its pixel limits (docs/serve.md)."""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass

ACCEPTED = ("PNG", "JPEG", "WEBP")  # Pillow's names
# what a refused file most likely is, for the error message
_OTHER_FORMATS = ((b"GIF8", "GIF"), (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"), (b"%!PS", "PostScript"),
                  (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"), (b"\x00\x00\x01\x00", "ICO"))
# JPEG start-of-frame markers, which carry the frame's size: C0-CF except DHT (C4), JPG (C8) and DAC (CC)
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_FILL = re.compile(rb"\xff+")
_JPEG_MAX_SEGMENTS = 1024  # before the frame header; real files have a dozen or so


class HeaderError(ValueError):
    """Bytes that are not an accepted image, or whose header cannot be read."""


@dataclass(frozen=True)
class ImageHeader:
    format: str  # one of ACCEPTED
    width: int
    height: int


def read_header(raw: bytes) -> ImageHeader:
    """The format and size `raw` declares; HeaderError for another format or a header cut short."""
    if raw[:8] == b"\x89PNG\r\n\x1a\n":
        header = _png(raw)
    elif raw[:3] == b"\xff\xd8\xff":
        header = _jpeg(raw)
    elif raw[:4] == b"RIFF" and raw[8:12] == b"WEBP":
        header = _webp(raw)
    else:
        kind = next((name for magic, name in _OTHER_FORMATS if raw.startswith(magic)), None)
        what = f"a {kind} file" if kind else f"not a readable image (it starts {raw[:8]!r})"
        raise HeaderError(f"{what}; send PNG, JPEG or WebP")
    if header.width < 1 or header.height < 1:
        raise HeaderError(f"its {header.format} header declares {header.width}x{header.height} pixels")
    return header


def _png(raw: bytes) -> ImageHeader:
    if len(raw) < 24 or raw[12:16] != b"IHDR":  # IHDR is the first chunk: length, type, width, height
        raise HeaderError("PNG header is cut short or does not start with IHDR")
    width, height = struct.unpack(">II", raw[16:24])
    return ImageHeader("PNG", width, height)


def _jpeg(raw: bytes) -> ImageHeader:
    i = 2  # after SOI
    for _ in range(_JPEG_MAX_SEGMENTS):
        fill = _JPEG_FILL.match(raw, i)
        if fill is None:
            raise HeaderError("JPEG header is damaged: no marker where one belongs")
        i = fill.end()  # at the marker's code
        if i + 8 > len(raw):
            raise HeaderError("JPEG header is cut short before its frame header")
        marker = raw[i]
        if marker in (0xD9, 0xDA):  # EOI, SOS: the data begins and no frame was declared
            raise HeaderError("JPEG has no frame header before its data")
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # markers without a segment
            i += 1
            continue
        (length,) = struct.unpack(">H", raw[i + 1:i + 3])
        if marker in _JPEG_SOF:  # length, precision, height, width
            height, width = struct.unpack(">HH", raw[i + 4:i + 8])
            return ImageHeader("JPEG", width, height)
        if length < 2:
            raise HeaderError(f"JPEG header is damaged: a segment of length {length}")
        i += 1 + length
    raise HeaderError(f"JPEG has no frame header in its first {_JPEG_MAX_SEGMENTS} segments")


def _webp(raw: bytes) -> ImageHeader:
    chunk = raw[12:16]  # the first chunk after RIFF <size> WEBP; its data starts at 20
    if chunk == b"VP8X" and len(raw) >= 30:  # extended: 24-bit canvas width - 1, height - 1
        return ImageHeader("WEBP", 1 + int.from_bytes(raw[24:27], "little"), 1 + int.from_bytes(raw[27:30], "little"))
    if chunk == b"VP8L" and len(raw) >= 25 and raw[20] == 0x2F:  # lossless: 14-bit width - 1, height - 1
        bits = int.from_bytes(raw[21:25], "little")
        return ImageHeader("WEBP", 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF))
    if chunk == b"VP8 " and len(raw) >= 30 and raw[23:26] == b"\x9d\x01\x2a":  # lossy: after the frame tag
        width, height = struct.unpack("<HH", raw[26:30])
        return ImageHeader("WEBP", width & 0x3FFF, height & 0x3FFF)
    raise HeaderError("WebP header is cut short or damaged")


__all__ = ["ACCEPTED", "HeaderError", "ImageHeader", "read_header"]
