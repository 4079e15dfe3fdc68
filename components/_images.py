"""The single source of image references for every component.

By digest when ``make images`` recorded one (images/digests.json: the image a tag named at build time can
never change under a running pipeline), else by tag = package version. ``SDTUNE_IMAGE`` /
``SDTUNE_TRAIN_IMAGE`` override either.
"""

import json
import os
from pathlib import Path

from sdtune import __version__

REGISTRY = os.environ.get("SDTUNE_IMAGE_REGISTRY", "ghcr.io/sdtune")
DIGESTS = Path(
    os.environ.get("SDTUNE_IMAGE_DIGESTS", Path(__file__).parent.parent / "images" / "digests.json")
)


def image_ref(name: str, digests: Path = DIGESTS, registry: str = REGISTRY) -> str:
    """``registry/name@sha256:…`` when a digest was recorded for this version, else ``registry/name:version``."""
    recorded = json.loads(digests.read_text()) if digests.is_file() else {}
    entry = recorded.get(name) or {}
    if entry.get("version") == __version__ and entry.get("digest"):
        return f"{registry}/{name}@{entry['digest']}"
    return f"{registry}/{name}:{__version__}"


# CPU-only steps (ingest, preprocess, caption, merge, register, run bookkeeping): the slim CPU image.
SDTUNE_IMAGE = os.environ.get("SDTUNE_IMAGE") or image_ref("sdtune")
# Train and evaluate: the CUDA image (CUDA 13: NVIDIA driver >= 580 on the GPU nodes).
SDTUNE_TRAIN_IMAGE = os.environ.get("SDTUNE_TRAIN_IMAGE") or image_ref("sdtune-train")
