"""DreamBooth: fine-tune the whole UNet on the subject, with prior preservation against language drift.

Run it::

    sdtune train --config configs/sd15/dreambooth_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- The whole UNet trains (SD3: the transformer, flow matching; text encoders and VAE frozen); AdamW, schedule, accumulation, seeding, logging and
  multi-process behaviour as in :mod:`.lora`. Use ``gradient_checkpointing`` and bf16 on real models.
- ``train.with_prior_preservation`` (default on here): each step also denoises class images captioned
  ``train.class_prompt`` ("a photo of {class_noun}"), loss = instance + ``prior_loss_weight`` × class
  (:mod:`.prior`, shared with :mod:`.lora`).
- Class images: ``train.class_data_dir`` when it holds at least ``num_class_images`` images; otherwise
  generated with the base model (``class_image_steps`` steps, seeded), shared out over the ranks, and cached
  under ``<model.cache_dir>/../class-images/<key>`` where the key hashes everything that determines them,
  so a retrain reuses them.
- Latents and text embeddings of instance and class images are computed once, before the loop.
- ``train.parallelism``: ``ddp`` (a replica per GPU) or ``fsdp`` (FSDP2: weights, grads and optimizer state
  sharded over the ranks, :mod:`.parallel`) — the SDXL full fine-tune on 40/80 GB cards.
- Checkpoints, exact resume and SIGTERM handling as in :mod:`.lora` (FSDP shards are gathered to rank 0).

Writes (rank 0): a full diffusers pipeline folder (``model_index.json``, ``unet/`` …: load it with
``from_pretrained``), ``model.safetensors`` in the original SD layout (SD 1.x, ``train.export_single_file``:
``from_single_file``, A1111, ComfyUI), ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.models.families import family_of
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .outputs import TrainResult, save_full_pipeline
from .prior import Prior, class_image_paths, denoising_step
from .session import Session


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Class images for prior preservation (generated once, cached by content).
        class_paths = class_image_paths(cfg, session)

        # 2. Model and data: instance and class images encoded once.
        parts = load_components(cfg)
        device, dtype = session.device, session.dtype
        instance = D.encode_records(parts, session.records, data_dir, cfg, device, dtype)
        prior = Prior.encode(parts, class_paths, cfg, session)
        samplers = {"class": prior.sampler} if prior else {}
        objective = L.objective_for(cfg, parts.noise_scheduler)
        vae_config = parts.vae.config
        parts.vae = parts.text_encoder = parts.text_encoder_2 = parts.text_encoder_3 = None

        name = family_of(cfg).denoiser  # the UNet, or SD3's transformer
        unet = session.trainable_unet(parts.denoiser)
        params = list(unet.parameters())
        desc = "dreambooth" + (" +prior" if prior is not None else "")
        unet = session.start({name: unet}, params, samplers=samplers, sampler="instance", desc=desc)[name]

        # 3. Loop: instance batch and class batch go through the denoiser together.
        for idx in session.steps():
            latents = D.sample_latents(vae_config, instance, idx, session.draw)
            text = D.cached_text(instance, idx)
            n = len(idx)
            if prior is not None:
                latents, text = prior.join(latents, text, vae_config, session.draw, device)
            denoising_step(parts, unet, objective, latents, text, n, prior, session)

        # 4. Save the whole pipeline with the new denoiser (rank 0).
        new_unet = session.trained_unet(unet)  # FSDP: gathered from the shards (every rank takes part)
        return session.finish(
            "dreambooth",
            lambda out: save_full_pipeline(cfg, new_unet, out),
            class_images=len(class_paths),
            parallelism="fsdp" if session.fsdp else "ddp",
        )
