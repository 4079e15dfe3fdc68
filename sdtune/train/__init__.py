"""Training recipes, one module per method, plus the pure pieces they share.

- :mod:`sdtune.train.lora`: LoRA on the UNet (SD 1.x/2.x/SDXL), diffusers + kohya files.
- :mod:`sdtune.train.textual_inversion`: new multi-vector tokens, all other embedding rows bit-identical.
- :mod:`sdtune.train.pivotal`: textual inversion + UNet LoRA together.
- :mod:`sdtune.train.dreambooth`: full UNet with prior preservation (class images generated and cached).
- :mod:`sdtune.train.data`, :mod:`~sdtune.train.losses`, :mod:`~sdtune.train.outputs`,
  :mod:`~sdtune.train.runtime`, :mod:`~sdtune.train.embeddings`, :mod:`~sdtune.train.export`: caching,
  objectives, output files and model card, accelerator/logging helpers, new tokens, kohya/A1111 formats.
- :mod:`sdtune.train.launch`: run a recipe as a subprocess (``torchrun`` for N processes).

:func:`run` picks the recipe named by ``train.method``.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.tracking import MetricLogger


def run(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None):
    """Train with the recipe for ``cfg.train.method``; returns its ``TrainResult``."""
    from importlib import import_module

    recipe = import_module(f"sdtune.train.{cfg.train.method}")
    return recipe.train(cfg, data_dir, out_dir, logger)
