"""Face detection for ``crop: face``: OpenCV's bundled Haar cascade (the optional ``faces`` extra).

Haar is old but small (a 1 MB XML shipped inside ``opencv-python-headless``), CPU-only and deterministic,
which is what a crop hint needs. Without OpenCV, :func:`load_detector` returns None and preprocessing
falls back to a centre crop, saying so in the report.
"""

from __future__ import annotations

from collections.abc import Callable

from PIL import Image

from sdtune.data.crop import Box

Detector = Callable[[Image.Image], list[Box]]
DETECT_SIDE = 640  # faces are found on a downscaled copy: Haar cost grows with pixels, accuracy does not


def load_detector() -> Detector | None:
    try:
        import cv2
    except ImportError:
        return None
    cascade = cv2.CascadeClassifier(cv2.data.haarcascades + "haarcascade_frontalface_default.xml")

    def detect(image: Image.Image) -> list[Box]:
        import numpy as np

        scale = min(1.0, DETECT_SIDE / max(image.size))
        small = (
            image if scale == 1.0 else image.resize((round(image.width * scale), round(image.height * scale)))
        )
        grey = np.asarray(small.convert("L"))
        found = cascade.detectMultiScale(grey, scaleFactor=1.1, minNeighbors=5, minSize=(24, 24))
        return [
            (round(x / scale), round(y / scale), round((x + w) / scale), round((y + h) / scale))
            for x, y, w, h in (found if len(found) else [])
        ]

    return detect
