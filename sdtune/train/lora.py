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

import contextlib
import time
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
from . import losses as L
from .outputs import TrainResult, save_unet_lora, write_run_files
from .runtime import (
    LossTracker,
    PreemptWatch,
    make_accelerator,
    make_optimizer,
    open_logger,
    progress,
    replicas_identical,
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
    found = C.find(cfg, out_dir, world, C.data_fingerprint(all_records))  # before any work: refuse early
    log = open_logger(accelerator, out_dir, logger, resume_step=found.step if found else 0)
    torch.manual_seed(tc.seed)
    watch = PreemptWatch(accelerator, tc.preempt_grace_s)

    try:
        # 1. Model and data. Frozen weights in half precision under mixed precision, fp32 otherwise.
        parts = load_components(cfg)
        dtype = weight_dtype(accelerator)
        records = D.shard(all_records, rank, world)
        cache = D.encode_records(parts, records, data_dir, cfg, device, dtype)
        scheduler = parts.noise_scheduler
        prediction_type = tc.prediction_type or scheduler.config.prediction_type
        vae_config = parts.vae.config
        del parts.vae  # the latents are cached; the text encoders too unless they train
        encoders: dict[str, torch.nn.Module] = {}
        if tc.train_text_encoder:
            token_ids = {
                k: v.to(device)
                for k, v in D.tokenize_prompts(parts, [D.caption_of(r, cfg) for r in records]).items()
            }
            encoders = {k: getattr(parts, k) for k in ("text_encoder", "text_encoder_2") if getattr(parts, k)}
        else:
            del parts.text_encoder, parts.text_encoder_2

        # 2. LoRA adapters on the UNet's attention projections (and the text encoders'); only they train (fp32).
        from peft import LoraConfig

        unet = parts.unet.to(device)
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
        te_params: list[torch.nn.Parameter] = []
        for encoder in encoders.values():
            encoder.to(device, dtype)
            encoder.add_adapter(
                LoraConfig(
                    r=tc.rank,
                    lora_alpha=tc.alpha or tc.rank,
                    init_lora_weights="gaussian",
                    target_modules=tc.text_encoder_target_modules,
                    use_dora=tc.use_dora,
                )
            )
            te_params += [p for p in encoder.parameters() if p.requires_grad]
        for p in params + te_params:
            p.data = p.data.float()
        if tc.gradient_checkpointing:
            unet.enable_gradient_checkpointing()

        from diffusers.optimization import get_scheduler

        groups = [{"params": params, "lr": tc.learning_rate}]
        if te_params:
            groups.append({"params": te_params, "lr": tc.text_encoder_lr or tc.learning_rate})
        optimizer = make_optimizer(tc, groups)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        # The text encoders stay unwrapped: their LoRA gradients are averaged over ranks by hand below (SDXL's
        # first encoder feeds its penultimate layer, so its last layer gets no gradient, which DDP rejects).
        unet, optimizer = accelerator.prepare(unet, optimizer)
        unet.train()
        for encoder in encoders.values():
            encoder.train()
        validate = Validator(cfg, out_dir, log, accelerator)

        # 3. Loop: one optimizer step per `step`, over `gradient_accumulation_steps` micro-batches. Every rank
        # draws the randomness of the global batch (same seed) and keeps its slice (see data.GlobalDraw).
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)
        batches = D.EpochSampler(len(cache), tc.batch_size, tc.seed + rank)
        state = C.TrainState(
            modules={"unet": accelerator.unwrap_model(unet), **encoders},
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
        bar = progress(accelerator, tc.max_steps, f"lora r{tc.rank}")
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches).to(device)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(unet)
                with sync, accelerator.autocast():
                    latents = D.scaled_latents(
                        vae_config, cache.latent_mean[idx], cache.latent_std[idx], draw
                    )
                    noise = L.sample_noise(latents, draw, tc.noise_offset)
                    t = L.sample_timesteps(len(idx), scheduler.config.num_train_timesteps, draw, device)
                    noisy = scheduler.add_noise(latents, noise, t)
                    if encoders:  # the trainable encoders run every step
                        ids = {k: v[idx] for k, v in token_ids.items()}
                        cond = D.unet_kwargs(D.text_conditioning(parts, ids, cfg.preprocess.resolution))
                    else:
                        cond = D.unet_conditioning(cache, idx)
                    pred = unet(noisy, t, **cond).sample
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
            if te_params and world > 1:
                _average_gradients(te_params)
            grad_norm = accelerator.clip_grad_norm_(params + te_params, tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            report_step(step, tc, tracker, lr_scheduler, grad_norm, bar, log)  # host sync on log steps
            validate(step, unet=accelerator.unwrap_model(unet), **encoders)
            C.end_of_step(step, cfg, out_dir, state, accelerator, tracker, watch)
        bar.close()
        validate.close()
        watch.close()
        seconds = time.perf_counter() - started
        trained = tc.max_steps - start

        # 4. Save (rank 0 only).
        result = TrainResult(
            out_dir=out_dir,
            method="lora",
            steps=tc.max_steps,
            final_loss=tracker.last_loss,
            seconds=round(seconds, 3),
            steps_per_sec=round(trained / max(seconds, 1e-9), 3),
            num_processes=world,
            extra={
                "resumed_from_step": start,
                "attempt": state.attempt,
                "text_encoder_lora": sorted(encoders),
                "dora": tc.use_dora,
                "prediction_type": prediction_type,
                "validation_grids": [str(p.relative_to(out_dir)) for p in validate.files],
            },
        )
        same = replicas_identical(accelerator.unwrap_model(unet), accelerator)  # all ranks take part
        if same is not None:
            result.extra["replicas_identical"] = same
        if accelerator.is_main_process:
            result.files = save_unet_lora(
                accelerator.unwrap_model(unet), out_dir, cfg, text_encoders=encoders
            )
            write_run_files(cfg, out_dir, result)
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the ranks (a parameter that got none counts as zero), one all_reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
