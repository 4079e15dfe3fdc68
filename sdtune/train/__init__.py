"""Training recipes, one module per method, plus the pure pieces they share.

- :mod:`sdtune.train.lora`: LoRA on the UNet (SD 1.x/2.x/SDXL), diffusers + kohya files.
- :mod:`sdtune.train.sd3_lora`: LoRA on the SD3 MMDiT transformer (and its CLIP encoders), flow matching
  (``method: lora`` with ``model.arch: sd3``).
- :mod:`sdtune.train.textual_inversion`: new multi-vector tokens, all other embedding rows bit-identical.
- :mod:`sdtune.train.pivotal`: textual inversion + a LoRA on the denoiser together.
- :mod:`sdtune.train.dreambooth`: full denoiser with prior preservation (class images generated and cached).
  These three and ``full`` run on SD3 too: the family's parts, text conditioning and model call come from
  :func:`sdtune.models.loading.load_components`, :func:`.data.text_conditioning` and :func:`.data.predict`.
- :mod:`sdtune.train.inpaint`: 9-channel inpainting UNet (LoRA or full), random/supplied masks.
- :mod:`sdtune.train.full`: full UNet fine-tune over a large captioned catalogue (EMA, latents sharded on disk).
- :mod:`sdtune.train.validation`: step-tagged sample grids during training; :mod:`~sdtune.train.masks`:
  inpainting masks; :mod:`~sdtune.train.single_file`: the original-SD-layout ``model.safetensors``.
- :mod:`sdtune.train.data`, :mod:`~sdtune.train.losses`, :mod:`~sdtune.train.outputs`,
  :mod:`~sdtune.train.runtime`, :mod:`~sdtune.train.embeddings`, :mod:`~sdtune.train.export`: caching,
  objectives, output files and model card, accelerator/logging helpers, new tokens, kohya/A1111 formats.
- :mod:`sdtune.train.launch`: run a recipe as a subprocess (``torchrun`` for N processes).
- :mod:`sdtune.train.session`: the training session every recipe runs in (the loop lives there, once).
- :mod:`sdtune.train.adapters`: the LoRA adapters; :mod:`~sdtune.train.class_images`: DreamBooth's class images.
- :mod:`sdtune.train.checkpoint`: atomic checkpoints (local or S3) and bit-exact resume, shared by every recipe.
- :mod:`sdtune.train.parallel`: FSDP2 applied to a plain UNet (``train.parallelism=fsdp``).
- :mod:`sdtune.train.plan`: parameter counts, memory per GPU, time and cost before any GPU is touched.

:func:`run` picks the recipe for ``train.method`` on the model's family (:mod:`sdtune.models.families`).
Every recipe runs inside one :class:`~sdtune.train.session.Session`, which owns what methods share:
processes, data shard, resume and preemption, the accumulate/clip/step loop, logging, validation, outputs.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.tracking import MetricLogger


def run(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None):
    """Train with the recipe for ``cfg.train.method``; returns its ``TrainResult``.

    Exit codes of ``sdtune train`` (docs/distributed.md): 2 bad config/data/incompatible checkpoint, 3 loss
    not finite, 5 out of accelerator memory — permanent; 75 preempted (checkpoint written) — retry.
    """
    from importlib import import_module

    import torch

    from sdtune.errors import ConfigError, OutOfMemory
    from sdtune.models.families import family_of

    if cfg.train.parallelism == "fsdp" and cfg.train.method not in ("dreambooth", "full"):
        raise ConfigError(
            "train.parallelism=fsdp is for full fine-tunes (train.method=dreambooth or full); "
            f"{cfg.train.method} trains a few MB: use ddp"
        )
    if cfg.train.parallelism == "fsdp" and cfg.train.option("train_text_encoder"):
        raise ConfigError(
            "train.parallelism=fsdp shards the UNet only: train.train_text_encoder needs parallelism ddp"
        )
    if (
        cfg.model.arch == "sd3"
        and cfg.train.method == "dreambooth"
        and cfg.train.option("train_text_encoder")
    ):
        raise ConfigError(
            "train.train_text_encoder with model.arch=sd3 is for train.method=lora (a LoRA on both CLIP "
            "encoders); SD3 DreamBooth trains the transformer only"
        )
    if cfg.train.parallelism == "fsdp" and cfg.train.mixed_precision == "fp16":
        raise ConfigError(
            "train.parallelism=fsdp needs mixed_precision bf16 or no (fp16 needs a sharded grad scaler)"
        )
    recipe = import_module(f"sdtune.train.{family_of(cfg).recipe(cfg.train.method)}")
    try:
        return recipe.train(cfg, data_dir, out_dir, logger)
    except torch.OutOfMemoryError as exc:
        from .plan import out_of_memory_advice

        raise OutOfMemory(out_of_memory_advice(cfg, exc)) from None
