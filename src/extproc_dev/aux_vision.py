"""A real, offline auxiliary vision model for the demo and tests: OCR (RapidOCR, whose wheel
ships its ONNX models) plus Pillow for size and main colours. Served OpenAI-compatible by the
emulator server (flavour ``ocr``): ``python -m extproc_dev.emulators --flavour ocr ...``.
"""

from __future__ import annotations

import io
import threading
from typing import Any

_engine: Any = None
_lock = threading.Lock()

_PALETTE = {
    "black": (0, 0, 0), "white": (255, 255, 255), "grey": (128, 128, 128), "red": (220, 30, 30),
    "green": (30, 160, 60), "blue": (30, 60, 200), "yellow": (240, 220, 40),
    "orange": (240, 140, 20), "purple": (130, 50, 160), "brown": (120, 70, 30),
    "pink": (240, 140, 180), "cyan": (40, 200, 220),
}


def _name(rgb: tuple[int, int, int]) -> str:
    return min(_PALETTE, key=lambda n: sum((a - b) ** 2 for a, b in zip(_PALETTE[n], rgb,
                                                                         strict=True)))


def _ocr(img: Any) -> list[str]:
    global _engine
    import numpy as np

    with _lock:
        if _engine is None:
            from rapidocr_onnxruntime import RapidOCR

            _engine = RapidOCR()
        result, _ = _engine(np.asarray(img.convert("RGB")))
    boxes = sorted(result or [], key=lambda r: (round(r[0][0][1] / 20), r[0][0][0]))
    return [str(r[1]) for r in boxes if float(r[2]) > 0.5]


def describe_image(data: bytes) -> str:
    """A factual description: size, format, main colours and the text OCR reads."""
    from PIL import Image

    img = Image.open(io.BytesIO(data))
    img.load()
    w, h = img.size
    small = img.convert("RGB").resize((48, 48))
    counts: dict[str, int] = {}
    for rgb in small.getdata():
        counts[_name(rgb)] = counts.get(_name(rgb), 0) + 1
    total = sum(counts.values())
    colours = ", ".join(f"{n} ({100 * c // total}%)" for n, c in
                        sorted(counts.items(), key=lambda x: -x[1])[:3])
    lines = _ocr(img)
    text = (f'Text in the image, read by OCR: "{" / ".join(lines)}".' if lines
            else "No text was found in the image.")
    return f"A {w}x{h} pixel {img.format or 'image'} image. Main colours: {colours}. {text}"


def warm_up() -> None:
    """Load the OCR engine and run it once on an image with words, so the first real request
    is not the slow one: on a blank image the recogniser never ran, and the first image with
    text then took 1.3 s instead of 0.45 (over 5 s on a loaded machine: a flaky e2e test)."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (300, 80), "white")
    ImageDraw.Draw(img).text((10, 20), "WARM UP", fill="black",
                             font=ImageFont.load_default(size=40))
    _ocr(img)
