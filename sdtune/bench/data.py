"""Preprocessing throughput: 1024-px JPEGs → 512-px centre crops, in images/s.

``python -m sdtune.bench.data [--images N]`` prints the figures as JSON; :func:`run_data_bench` returns
them (``make bench`` calls it). Measured: JPEG inputs with 1 and 2 worker processes, JPEG without
``Image.draft`` (what draft saves), and PNG inputs, which is what an ingest stage directory holds.
Pin threads (``OMP_NUM_THREADS=1``) and say which machine when quoting the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageFilter

from sdtune.config import PreprocessConfig
from sdtune.data import preprocess as P
from sdtune.manifest import Record, StageReport, write_stage


def photo_like(seed: int, size: int = 1024) -> Image.Image:
    """Smooth colour fields plus grain: compresses and decodes like a photo, unlike flat colour or noise."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    grain = rng.normal(0, 8, (size, size, 3))
    return Image.fromarray(np.clip(np.asarray(coarse) + grain, 0, 255).astype(np.uint8)).filter(
        ImageFilter.SMOOTH
    )


def write_inputs(folder: Path, n: int, fmt: str) -> Path:
    folder.mkdir(parents=True)
    records = []
    for i in range(n):
        name = f"{i:06d}.{'jpg' if fmt == 'JPEG' else 'png'}"
        photo_like(i).save(
            folder / name, format=fmt, **({"quality": 90} if fmt == "JPEG" else {"compress_level": 1})
        )
        records.append(Record(file=name, width=1024, height=1024, sha256="-", source=name))
    write_stage(folder, records, StageReport(stage="bench"))
    return folder


def _rate(in_dir: Path, out_dir: Path, workers: int, n: int) -> float:
    started = time.perf_counter()
    P.preprocess_dir(in_dir, out_dir, PreprocessConfig(resolution=512, workers=workers))
    return round(n / (time.perf_counter() - started), 2)


def run_data_bench(images: int = 32) -> dict[str, Any]:
    """images/s for each setting; process start-up is included (it is part of a real run)."""
    images = max(images, 2 * P.MIN_PER_WORKER)  # below that, 2 workers fall back to 1
    with tempfile.TemporaryDirectory(prefix="sdtune-bench-") as tmp:
        root = Path(tmp)
        jpegs = write_inputs(root / "jpeg", images, "JPEG")
        pngs = write_inputs(root / "png", images, "PNG")
        result = {
            "jpeg_1_worker": _rate(jpegs, root / "o1", 1, images),
            "jpeg_2_workers": _rate(jpegs, root / "o2", 2, images),
            "png_1_worker": _rate(pngs, root / "o4", 1, images),
        }
        P.USE_DRAFT = False
        try:
            result["jpeg_1_worker_no_draft"] = _rate(jpegs, root / "o3", 1, images)
        finally:
            P.USE_DRAFT = True
    return {
        "unit": "images/s",
        "task": "1024x1024 JPEG (q90) / PNG → 512x512 centre crop, Lanczos, PNG out",
        "images": images,
        "cpus": os.cpu_count(),
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "machine": platform.processor() or platform.machine(),
        **result,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    print(json.dumps(run_data_bench(parser.parse_args().images), indent=2))


if __name__ == "__main__":
    main()
