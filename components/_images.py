"""The single source of image references for every component: tag = package version."""

import os

from sdtune import __version__

REGISTRY = os.environ.get("SDTUNE_IMAGE_REGISTRY", "ghcr.io/sdtune")
# Light steps (ingest, preprocess, caption, register): the slim CPU image.
SDTUNE_IMAGE = os.environ.get("SDTUNE_IMAGE", f"{REGISTRY}/sdtune:{__version__}")
# Train and evaluate: the CUDA image.
SDTUNE_TRAIN_IMAGE = os.environ.get("SDTUNE_TRAIN_IMAGE", f"{REGISTRY}/sdtune-train:{__version__}")
