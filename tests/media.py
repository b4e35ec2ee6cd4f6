"""Test media made on the fly: real audio clips (soundfile) and a real PNG."""

from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import soundfile

RATE = 16000


def clip(fmt: str, seconds: float = 0.25) -> bytes:
    t = np.arange(int(RATE * seconds)) / RATE
    samples = (0.3 * np.sin(2 * np.pi * 440 * t)).astype("float32")
    buf = io.BytesIO()
    kw = {"wav": {"format": "WAV", "subtype": "PCM_16"}, "flac": {"format": "FLAC"},
          "ogg": {"format": "OGG", "subtype": "VORBIS"}, "mp3": {"format": "MP3"}}[fmt]
    soundfile.write(buf, samples, RATE, **kw)
    return buf.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png(width: int = 2, height: int = 2) -> bytes:
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(
            ">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def data_url(mime: str, data: bytes) -> str:
    return f"data:{mime};base64,{b64(data)}"


def text_image(text: str, size: tuple[int, int] = (460, 120)) -> bytes:
    """A PNG with ``text`` drawn large enough for OCR to read."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", size, "white")
    ImageDraw.Draw(img).text((20, 35), text, fill="black", font=ImageFont.load_default(size=44))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
