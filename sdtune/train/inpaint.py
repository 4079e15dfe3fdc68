"""Inpainting fine-tune of a 9-channel UNet (LoRA by default, or the whole UNet) — the recipe, top to bottom.

Run it::

    sdtune train --config configs/sd15/inpaint_lora_1gpu.yaml --data DIR --out DIR

The UNet's input is ``[noisy latents (4), mask (1), masked-image latents (4)]`` as in
``StableDiffusionInpaintPipeline``; the objective is the usual denoising loss on the full image.

Features (config key → behaviour; everything else as in :mod:`.lora`):

- ``model.base``: an inpainting model (UNet ``in_channels == 9``; ``sdtune models tiny --arch sd15-inpaint``
  for tests). Any other model is refused with one line.
- ``train.inpaint_masks``: ``random`` (seeded rectangles and brush strokes, :mod:`.masks`), ``supplied``
  (``<file>.mask.png`` written by preprocess with ``preprocess.mask_prompt``: the record's ``extra.mask``) or
  ``both`` (the supplied mask, when there is one, plus random ones).
- ``train.inpaint_masks_per_image``: mask variants per image. Each variant's masked image is VAE-encoded ONCE
  before the loop (the VAE never runs in the loop); each step picks a variant per sample (seeded).
- ``train.inpaint_full_unet``: train the whole UNet instead of a LoRA (output: a full inpainting pipeline).
- ``train.validation_every``: grids of the first training image with a centred square to fill.

Writes (rank 0): a LoRA (``pytorch_lora_weights.safetensors`` + kohya file, loads into
``StableDiffusionInpaintPipeline`` with ``load_lora_weights``) or, with ``inpaint_full_unet``, a full diffusers
inpainting pipeline folder; ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_components, load_pipeline
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from . import masks as M
from .adapters import add_lora, to_fp32
from .outputs import TrainResult, save_lora
from .session import Session


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Model; images, mask variants and captions encoded once.
        parts = load_components(cfg)
        if parts.unet.config.in_channels != 9:
            raise ConfigError(
                f"train.method=inpaint needs an inpainting model (UNet with 9 input channels); {cfg.model.base} "
                f"has {parts.unet.config.in_channels} (tiny one: `sdtune models tiny --arch sd15-inpaint`)"
            )
        device, dtype, records = session.device, session.dtype, session.records
        cache = D.encode_records(parts, records, data_dir, cfg, device, dtype)
        mask_lat, masked_lat, supplied = M.encode_mask_variants(parts, records, data_dir, cfg, device)
        mask_lat, masked_lat = mask_lat.to(dtype), masked_lat.to(dtype)
        objective = L.objective_for(cfg, parts.noise_scheduler)
        vae_config = parts.vae.config
        del parts.vae, parts.text_encoder, parts.text_encoder_2

        # 2. A LoRA on the attention projections, or the whole UNet.
        if tc.inpaint_full_unet:
            unet = session.trainable_unet(parts.unet)
            params = list(unet.parameters())
        else:
            unet = session.place(parts.unet)
            params = add_lora(unet, tc, tc.target_modules, use_dora=tc.use_dora)
            to_fp32(params)
        unet = session.start(
            {"unet": unet},
            params,
            validation_inputs=M.validation_inputs(records[0], data_dir, cfg),
            desc="inpaint" + (" full" if tc.inpaint_full_unet else " lora"),
        )["unet"]

        # 3. Loop: each sample gets one of its image's mask variants; the UNet sees [noisy, mask, masked].
        n_variants = mask_lat.shape[1]
        for idx in session.steps():
            latents = D.sample_latents(vae_config, cache, idx, session.draw)
            variant = session.draw.randint(n_variants, len(idx), device)
            noisy, t, target = objective.add_noise(latents, session.draw)
            model_input = torch.cat([noisy, mask_lat[idx, variant], masked_lat[idx, variant]], dim=1)
            pred = unet(model_input, t, **D.unet_conditioning(cache, idx)).sample
            session.backward(objective.loss(pred, target, t).mean())

        # 4. Save (rank 0): the LoRA, or the whole inpainting pipeline with the new UNet.
        def save(out: Path) -> list[str]:
            new_unet = session.plain_models()["unet"]
            if not tc.inpaint_full_unet:
                return save_lora(new_unet, out, cfg)
            # the diffusers folder only: the single-file writer is for text-to-image
            load_pipeline(cfg, unet=new_unet.to(torch.float32).eval()).save_pretrained(
                out, safe_serialization=True
            )
            return ["model_index.json"]

        return session.finish(
            "inpaint",
            save,
            trains="unet" if tc.inpaint_full_unet else "lora",
            mask_variants_per_image=n_variants,
            supplied_masks=supplied,
        )
