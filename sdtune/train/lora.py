"""LoRA fine-tuning of the UNet of SD 1.x / 2.x / SDXL — the recipe, top to bottom.

Run it::

    sdtune train --config configs/debug/tiny_cpu.yaml --data DIR --out DIR            # 1 process
    torchrun --standalone --nproc_per_node 8 -m sdtune.cli train --config configs/sd15/lora_1gpu.yaml \\
        --data DIR --out DIR train.num_processes=8                                        # 8 GPUs, one node

Features (config key → behaviour):

- ``model.base`` / ``model.arch``: local folder, ``s3://`` or hub id; ``sdxl`` adds the second text encoder
  and size/crop conditioning.
- ``train.rank``, ``train.alpha`` (default = rank), ``train.target_modules``: the peft ``LoraConfig``;
  ``train.use_dora``: weight-decomposed LoRA (DoRA; diffusers file only, kohya has no DoRA format).
- ``train.train_text_encoder``: a LoRA on the text encoder(s) too (``text_encoder_target_modules``), at
  ``text_encoder_lr``; captions are then tokenized once and encoded every step (the encoder changes).
- ``train.with_prior_preservation`` (default off for LoRA): each step also denoises class images captioned
  ``train.class_prompt``, loss = instance + ``prior_loss_weight`` × class (DreamBooth-LoRA; :mod:`.prior`,
  class images as in :mod:`.dreambooth`). Without it the adapter moves the class prompt as much as the
  trigger prompt (docs/evaluation.md).
- ``train.validation_every``: sample grids with the current weights (:mod:`sdtune.train.validation`).
- Data: the ``split == "train"`` records of the stage directory at ``preprocess.resolution``, sharded by
  rank; VAE latents and text embeddings are computed ONCE before the loop (see :mod:`sdtune.train.data`).
- ``train.batch_size`` per process, ``gradient_accumulation_steps``, ``max_grad_norm``, AdamW
  (``learning_rate``, ``adam_weight_decay``), ``lr_scheduler`` constant/cosine with ``lr_warmup_steps``.
- ``train.prediction_type`` (default: the scheduler's), ``snr_gamma`` (min-SNR-γ), ``noise_offset``.
- ``train.mixed_precision`` bf16/fp16 on GPUs (fp32 on CPU), ``gradient_checkpointing``.
- ``train.seed``: same seed, same data, same process count → same weights.
- ``train.log_every``: loss/lr/grad-norm/steps-per-second logged every N steps (host syncs: these, and one
  scalar all_reduce per step so every rank sees a SIGTERM at the same step).
- ``train.checkpoint_every`` / ``keep_checkpoints`` / ``checkpoint_dir`` / ``resume``: atomic checkpoints and
  bit-exact resume (:mod:`sdtune.train.checkpoint`); SIGTERM → checkpoint + exit 75 within ``preempt_grace_s``.
- ``train.optimizer``: adamw, adamw8bit (bitsandbytes, GPU), or sgd (for exact multi-process equivalence checks).

Writes (rank 0): ``pytorch_lora_weights.safetensors`` (diffusers), ``lora_kohya.safetensors`` (kohya/A1111/
ComfyUI, unless ``train.export_kohya=false``), ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``,
``README.md`` (model card), ``checkpoints/``. Raises :class:`~sdtune.errors.TrainingError` when the loss is not
finite (no checkpoint written), :class:`~sdtune.errors.Preempted` after a SIGTERM checkpoint.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .adapters import add_lora, add_text_encoder_lora, lora_groups, to_fp32
from .outputs import TrainResult, save_lora
from .prior import Prior, class_image_paths, denoising_step
from .session import Session
from .text_encoders import StepConditioning, TrainableText


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Model and data. Frozen weights in half precision under mixed precision, fp32 otherwise.
        class_paths = class_image_paths(cfg, session)  # prior preservation: generated before the model loads
        parts = load_components(cfg)
        device, dtype = session.device, session.dtype
        cache = D.encode_records(parts, session.records, data_dir, cfg, device, dtype)
        prior = Prior.encode(parts, class_paths, cfg, session)
        objective = L.objective_for(cfg, parts.noise_scheduler)
        vae_config = parts.vae.config
        del parts.vae  # the latents are cached; the text encoders too unless they train
        text = TrainableText.prepare(parts, cfg, session.records, prior, device)
        encoders = text.encoders if text else {}

        # 2. LoRA adapters on the UNet's attention projections (and the text encoders'); only they train (fp32).
        unet = parts.unet.to(device)
        if dtype != torch.float32:
            unet.to(dtype)
        params = add_lora(unet, tc, tc.target_modules, use_dora=tc.use_dora)
        te_params = add_text_encoder_lora(encoders, tc, device, dtype)
        to_fp32(params + te_params)
        # The text encoders stay unwrapped: their gradients are averaged over ranks by hand (.text_encoders).
        models = session.start(
            {"unet": unet, **encoders},
            params + te_params,
            groups=lora_groups(tc, params, te_params),
            prepare=["unet"],
            average_grads=te_params,
            samplers={"class": prior.sampler} if prior else None,
            desc=f"lora r{tc.rank}" + (" +prior" if prior else ""),
        )
        unet = models["unet"]

        conditioning = StepConditioning(cache, prior, text, vae_config)

        # 3. Loop: the denoising loss on cached latents (the trainable text encoders run every step).
        for idx in session.steps():
            latents = D.sample_latents(vae_config, cache, idx, session.draw)
            n = len(idx)
            latents, cond = conditioning.inputs(latents, idx, session)
            denoising_step(parts, unet, objective, latents, cond, n, prior, session)

        # 4. Save (rank 0 only).
        return session.finish(
            "lora",
            lambda out: save_lora(session.plain_models()["unet"], out, cfg, text_encoders=encoders),
            check_replicas=True,
            text_encoder_lora=sorted(encoders),
            dora=tc.use_dora,
            class_images=len(class_paths),
            prediction_type=objective.prediction_type,
        )
