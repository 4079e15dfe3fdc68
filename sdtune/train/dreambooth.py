"""DreamBooth: fine-tune the whole UNet on the subject, with prior preservation against language drift.

Run it::

    sdtune train --config configs/sd15/dreambooth_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- The whole UNet trains (SD3: the transformer, flow matching; VAE frozen); AdamW, schedule, accumulation, seeding, logging and
  multi-process behaviour as in :mod:`.lora`. Use ``gradient_checkpointing`` and bf16 on real models.
- ``train.train_text_encoder``: the whole text encoder(s) train too (SDXL: both), at ``text_encoder_lr``
  (default ``learning_rate``); captions are tokenized once and encoded every step, the class prompt through
  the training encoders too (:mod:`.text_encoders`, shared with :mod:`.lora`). Without it the text encoders
  stay frozen, and on a base that barely tells the trigger prompt from the class prompt a UNet-only change
  lowers both prompts' loss alike (docs/evaluation.md). Not with ``parallelism: fsdp`` (refused).
- ``train.with_prior_preservation`` (default on here): each step also denoises class images captioned
  ``train.class_prompt`` ("a photo of {class_noun}"), loss = instance + ``prior_loss_weight`` × class
  (:mod:`.prior`, shared with :mod:`.lora`).
- Class images: ``train.class_data_dir`` when it holds at least ``num_class_images`` images; otherwise
  generated with the base model (``class_image_steps`` steps at ``class_image_guidance``, seeded), shared out
  over the ranks, and cached under ``<model.cache_dir>/../class-images/<key>`` where the key hashes
  everything that determines them, so a retrain reuses them.
- Latents and text embeddings of instance and class images are computed once, before the loop.
- ``train.parallelism``: ``ddp`` (a replica per GPU) or ``fsdp`` (FSDP2: weights, grads and optimizer state
  sharded over the ranks, :mod:`.parallel`) — the SDXL full fine-tune on 40/80 GB cards.
- Checkpoints, exact resume and SIGTERM handling as in :mod:`.lora` (FSDP shards are gathered to rank 0).

Writes (rank 0): a full diffusers pipeline folder (``model_index.json``, ``unet/``, ``text_encoder/`` — the
trained one with ``train_text_encoder`` — …: load it with ``from_pretrained``), ``model.safetensors`` in the original SD layout (SD 1.x, ``train.export_single_file``:
``from_single_file``, A1111, ComfyUI), ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.families import family_of
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .adapters import lora_groups
from .outputs import TrainResult, save_full_pipeline
from .prior import Prior, class_image_paths, denoising_step
from .session import Session
from .text_encoders import StepConditioning, TrainableText


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
        parts.vae = None  # the latents are cached; the text encoders too unless they train
        text = TrainableText.prepare(parts, cfg, session.records, prior, device)
        encoders = text.encoders if text else {}

        name = family_of(cfg).denoiser  # the UNet, or SD3's transformer
        unet = session.trainable_unet(parts.denoiser)
        params = list(unet.parameters())
        te_params: list = []
        for encoder in encoders.values():  # fp32 master weights, as the UNet's
            encoder.to(device).requires_grad_(True)
            te_params += list(encoder.parameters())
        desc = "dreambooth" + (" +text" if text else "") + (" +prior" if prior is not None else "")
        models = session.start(
            {name: unet, **encoders},
            params + te_params,
            groups=lora_groups(cfg.train, params, te_params),
            prepare=[name],
            average_grads=te_params,  # the text encoders stay unwrapped (.text_encoders)
            samplers=samplers,
            sampler="instance",
            desc=desc,
        )
        unet = models[name]

        conditioning = StepConditioning(instance, prior, text, vae_config)

        # 3. Loop: instance batch and class batch go through the denoiser together.
        for idx in session.steps():
            latents = D.sample_latents(vae_config, instance, idx, session.draw)
            n = len(idx)
            latents, cond = conditioning.inputs(latents, idx, session)
            denoising_step(parts, unet, objective, latents, cond, n, prior, session)

        # 4. Save the whole pipeline with the new denoiser (and text encoders) (rank 0).
        new_unet = session.trained_unet(unet)  # FSDP: gathered from the shards (every rank takes part)
        new_encoders = {k: m.to(torch.float32).eval() for k, m in encoders.items()}
        return session.finish(
            "dreambooth",
            lambda out: save_full_pipeline(cfg, new_unet, out, **new_encoders),
            class_images=len(class_paths),
            text_encoders_trained=sorted(encoders),
            parallelism="fsdp" if session.fsdp else "ddp",
        )
