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

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtune.config import RunConfig
from sdtune.errors import ConfigError, DatasetError
from sdtune.models.loading import load_components, load_pipeline
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
from . import losses as L
from . import masks as M
from . import parallel as P
from .outputs import TrainResult, save_unet_lora, write_run_files
from .runtime import (
    LossTracker,
    PreemptWatch,
    make_accelerator,
    make_optimizer,
    open_logger,
    progress,
    report_step,
    shutdown,
    weight_dtype,
)
from .validation import Validator


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    accelerator = make_accelerator(tc)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir.mkdir(parents=True, exist_ok=True)
    all_records = D.train_records(cfg, data_dir)
    found = C.find(cfg, out_dir, world, C.data_fingerprint(all_records))
    log = open_logger(accelerator, out_dir, logger, resume_step=found.step if found else 0)
    torch.manual_seed(tc.seed)
    watch = PreemptWatch(accelerator, tc.preempt_grace_s)

    try:
        # 1. Model; images, mask variants and captions encoded once.
        parts = load_components(cfg)
        if parts.unet.config.in_channels != 9:
            raise ConfigError(
                f"train.method=inpaint needs an inpainting model (UNet with 9 input channels); {cfg.model.base} "
                f"has {parts.unet.config.in_channels} (tiny one: `sdtune models tiny --arch sd15-inpaint`)"
            )
        dtype = weight_dtype(accelerator)
        records = D.shard(all_records, rank, world)
        cache = D.encode_records(parts, records, data_dir, cfg, device, dtype)
        mask_lat, masked_lat, supplied = _encode_mask_variants(parts, records, data_dir, cfg, device)
        mask_lat, masked_lat = mask_lat.to(dtype), masked_lat.to(dtype)
        scheduler = parts.noise_scheduler
        prediction_type = tc.prediction_type or scheduler.config.prediction_type
        vae_config = parts.vae.config
        del parts.vae, parts.text_encoder, parts.text_encoder_2

        # 2. A LoRA on the attention projections, or the whole UNet.
        unet = parts.unet.to(device)
        if tc.inpaint_full_unet:
            unet.requires_grad_(True)
        else:
            from peft import LoraConfig

            if dtype != torch.float32:
                unet.to(dtype)
            unet.add_adapter(
                LoraConfig(
                    r=tc.rank,
                    lora_alpha=tc.alpha or tc.rank,
                    init_lora_weights="gaussian",
                    target_modules=tc.target_modules,
                    use_dora=tc.use_dora,
                )
            )
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if tc.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(tc, params)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        unet, optimizer = accelerator.prepare(unet, optimizer)
        unet.train()
        validate = Validator(cfg, out_dir, log, accelerator, **_validation_inputs(records[0], data_dir, cfg))

        # 3. Loop: each sample gets one of its image's mask variants; the UNet sees [noisy, mask, masked].
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)
        batches = D.EpochSampler(len(cache), tc.batch_size, tc.seed + rank)
        n_variants = mask_lat.shape[1]
        state = C.TrainState(
            modules={"unet": accelerator.unwrap_model(unet)},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            generators={"noise": gen},
            samplers={"data": batches},
            scaler=accelerator.scaler,
            data_fingerprint=C.data_fingerprint(all_records),
        )
        start = C.load(found, state, accelerator) if found else 0
        tracker = LossTracker(accelerator, names=[r.file for r in records])
        tracker.last_loss = state.last_loss
        bar = progress(accelerator, tc.max_steps, "inpaint" + (" full" if tc.inpaint_full_unet else " lora"))
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches).to(device)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                with P.maybe_no_sync(unet, accelerator, last_micro), accelerator.autocast():
                    latents = D.scaled_latents(
                        vae_config, cache.latent_mean[idx], cache.latent_std[idx], draw
                    )
                    variant = draw.randint(n_variants, len(idx), device)
                    mask = mask_lat[idx, variant]
                    masked = masked_lat[idx, variant]
                    noise = L.sample_noise(latents, draw, tc.noise_offset)
                    t = L.sample_timesteps(len(idx), scheduler.config.num_train_timesteps, draw, device)
                    noisy = scheduler.add_noise(latents, noise, t)
                    model_input = torch.cat([noisy, mask, masked], dim=1)
                    pred = unet(model_input, t, **D.unet_conditioning(cache, idx)).sample
                    target = L.prediction_target(scheduler, latents, noise, t, prediction_type)
                    loss = L.diffusion_loss(
                        pred,
                        target,
                        timesteps=t,
                        scheduler=scheduler,
                        snr_gamma=tc.snr_gamma,
                        prediction_type=prediction_type,
                    ).mean()
                    accelerator.backward(loss / tc.gradient_accumulation_steps)
                tracker.add(loss, step, idx)
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            report_step(step, tc, tracker, lr_scheduler, grad_norm, bar, log)  # host sync on log steps
            validate(step, unet=accelerator.unwrap_model(unet))
            C.end_of_step(step, cfg, out_dir, state, accelerator, tracker, watch)
        bar.close()
        validate.close()
        watch.close()
        seconds = time.perf_counter() - started
        trained = tc.max_steps - start

        # 4. Save (rank 0): the LoRA, or the whole inpainting pipeline with the new UNet.
        result = TrainResult(
            out_dir=out_dir,
            method="inpaint",
            steps=tc.max_steps,
            final_loss=tracker.last_loss,
            seconds=round(seconds, 3),
            steps_per_sec=round(trained / max(seconds, 1e-9), 3),
            num_processes=world,
            extra={
                "trains": "unet" if tc.inpaint_full_unet else "lora",
                "mask_variants_per_image": n_variants,
                "supplied_masks": supplied,
                "resumed_from_step": start,
                "attempt": state.attempt,
                "validation_grids": [str(p.relative_to(out_dir)) for p in validate.files],
            },
        )
        if accelerator.is_main_process:
            new_unet = accelerator.unwrap_model(unet)
            if tc.inpaint_full_unet:  # the diffusers folder only: the single-file writer is for text-to-image
                pipe = load_pipeline(cfg, unet=new_unet.to(torch.float32).eval())
                pipe.save_pretrained(out_dir, safe_serialization=True)
                result.files = ["model_index.json"]
            else:
                result.files = save_unet_lora(new_unet, out_dir, cfg)
            write_run_files(cfg, out_dir, result)
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result


@torch.no_grad()
def _encode_mask_variants(parts, records, data_dir: Path, cfg: RunConfig, device):
    """For each record, ``inpaint_masks_per_image`` masks (supplied first, then seeded random ones) at latent
    size ``[N, K, 1, h, w]`` and the VAE latents of the masked images ``[N, K, 4, h, w]`` (scaled). Also returns
    how many supplied masks were used."""
    tc, res = cfg.train, cfg.preprocess.resolution
    k = tc.inpaint_masks_per_image
    all_masks, all_pixels, supplied = [], [], 0
    for record in records:
        pixels = D.load_image(Path(data_dir) / record.file, res)
        masks = []
        if tc.inpaint_masks in ("supplied", "both") and record.extra.get("mask"):
            masks.append(M.load_mask(Path(data_dir) / record.extra["mask"], res))
            supplied += 1
        elif tc.inpaint_masks == "supplied":
            raise DatasetError(
                f"{record.file}: train.inpaint_masks=supplied but the record has no mask (run preprocess with "
                "preprocess.mask_prompt, or use inpaint_masks=both)"
            )
        if tc.inpaint_masks != "supplied":
            masks += [
                M.random_mask(res, M.mask_seed(tc.seed, record.sha256, j)) for j in range(k - len(masks))
            ]
        masks = (masks * k)[:k]  # supplied only: the one mask, repeated
        all_masks.append(torch.stack(masks))
        all_pixels.append(torch.stack([M.masked_image(pixels, m) for m in masks]))
    masks = torch.stack(all_masks)  # [N, K, 1, H, W]
    n = masks.shape[0]
    mean, _ = D.encode_images(parts.vae, torch.cat(all_pixels), device)
    scale = parts.vae.config.scaling_factor
    shift = getattr(parts.vae.config, "shift_factor", None) or 0.0
    masked_latents = ((mean - shift) * scale).reshape(n, k, *mean.shape[1:])
    small = F.interpolate(masks.flatten(0, 1), size=mean.shape[-2:]).reshape(n, k, 1, *mean.shape[-2:])
    return small.to(device), masked_latents, supplied


def _validation_inputs(record, data_dir: Path, cfg: RunConfig) -> dict:
    """The first training image with a centred square (half the side) to fill."""
    from PIL import Image

    res = cfg.preprocess.resolution
    with Image.open(Path(data_dir) / record.file) as im:
        image = im.convert("RGB").resize((res, res))
    mask = Image.new("L", (res, res), 0)
    mask.paste(255, (res // 4, res // 4, 3 * res // 4, 3 * res // 4))
    return {"image": image, "mask_image": mask}
