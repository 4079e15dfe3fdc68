"""Full fine-tune of the UNet on a large captioned catalogue (the 8×A100 case) — the recipe, top to bottom.

Run it::

    sdtune train --config configs/sd15/full_1gpu.yaml --data DIR --out DIR
    torchrun --standalone --nproc_per_node 8 -m sdtune.cli train --config configs/sd15/full_8xa100-80gb.yaml \\
        --data DIR --out DIR train.num_processes=8

Features (config key → behaviour; the rest as in :mod:`.dreambooth`, without prior preservation):

- Text-to-image objective over every ``train`` record with its OWN caption (the catalogue's captions, e.g.
  from the data stage's sharded output); records without one fall back to ``caption.template`` and are
  counted in the summary (``uncaptioned``).
- Latents and text embeddings cached to disk in shards (:mod:`.latent_cache`:
  ``<out>/cache/latents-NNNNN.safetensors``, each rank its own, no collectives while caching, reused when
  unchanged) and read back a batch at a time, so memory stays flat however large the catalogue.
- ``train.use_ema`` / ``ema_decay``: an exponential moving average of the UNet weights (diffusers
  ``EMAModel``), checkpointed with the rest, and what is saved at the end. Not with FSDP (the EMA would hold
  only this rank's shards): use DDP or no EMA there.
- ``train.parallelism``: ``ddp`` or ``fsdp`` (FSDP2 over the UNet, :mod:`.parallel`), as in DreamBooth.
- ``train.validation_every``: step-tagged grids (:mod:`.validation`).

Writes (rank 0): a diffusers pipeline folder (``model_index.json``, ``unet/`` …), and with
``train.export_single_file`` (default) ``model.safetensors`` in the original SD layout
(:mod:`.single_file`); ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
from . import latent_cache as LC
from . import losses as L
from . import parallel as P
from .outputs import TrainResult, save_full_pipeline, write_run_files
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
    if tc.use_ema and tc.parallelism == "fsdp":
        raise ConfigError(
            "train.use_ema is not supported with train.parallelism=fsdp yet: use ddp, or no EMA"
        )
    accelerator = make_accelerator(tc)
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    out_dir.mkdir(parents=True, exist_ok=True)
    all_records = D.train_records(cfg, data_dir)
    found = C.find(cfg, out_dir, world, C.data_fingerprint(all_records))
    log = open_logger(accelerator, out_dir, logger, resume_step=found.step if found else 0)
    torch.manual_seed(tc.seed)
    watch = PreemptWatch(accelerator, tc.preempt_grace_s)

    try:
        # 1. Model; this rank's records encoded into disk shards (reused when unchanged), read a batch at a time.
        parts = load_components(cfg)
        dtype = weight_dtype(accelerator)
        records = D.shard(all_records, rank, world)
        shard_paths, written = LC.build(parts, records, data_dir, cfg, out_dir / "cache", rank, world, device)
        cache = LC.ShardedLatents(shard_paths, device, dtype)
        scheduler = parts.noise_scheduler
        prediction_type = tc.prediction_type or scheduler.config.prediction_type
        vae_config = parts.vae.config
        del parts.vae, parts.text_encoder, parts.text_encoder_2

        unet = parts.unet.to(device)  # fp32 master weights; autocast does the half-precision maths
        unet.requires_grad_(True)
        if tc.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        fsdp = tc.parallelism == "fsdp" and world > 1
        if fsdp:
            P.apply_fsdp(unet)
        params = list(unet.parameters())
        ema = None
        if tc.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(params, decay=tc.ema_decay)
            ema.to(device)

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(tc, params)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        if not fsdp:
            unet, optimizer = accelerator.prepare(unet, optimizer)
        unet.train()
        validate = Validator(cfg, out_dir, log, accelerator, all_ranks=fsdp)

        # 2. Loop.
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)
        batches = D.EpochSampler(len(cache), tc.batch_size, tc.seed + rank)
        state = C.TrainState(
            modules={"unet": unet if fsdp else accelerator.unwrap_model(unet)},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            generators={"noise": gen},
            samplers={"data": batches},
            scaler=accelerator.scaler,
            ema=ema,
            fsdp=fsdp,
            data_fingerprint=C.data_fingerprint(all_records),
        )
        start = C.load(found, state, accelerator) if found else 0
        tracker = LossTracker(accelerator, names=[r.file for r in records])
        tracker.last_loss = state.last_loss
        bar = progress(accelerator, tc.max_steps, "full" + (" +ema" if ema else ""))
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches)
                batch = cache.batch(idx)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                with P.maybe_no_sync(unet, accelerator, last_micro), accelerator.autocast():
                    all_rows = torch.arange(len(idx), device=device)
                    latents = D.scaled_latents(vae_config, batch.latent_mean, batch.latent_std, draw)
                    noise = L.sample_noise(latents, draw, tc.noise_offset)
                    t = L.sample_timesteps(len(idx), scheduler.config.num_train_timesteps, draw, device)
                    noisy = scheduler.add_noise(latents, noise, t)
                    pred = unet(noisy, t, **D.unet_conditioning(batch, all_rows)).sample
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
                tracker.add(loss, step, idx.to(device))
            grad_norm = P.clip_grad_norm(unet, params, accelerator, tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            if ema is not None:
                ema.step(params)
            bar.update(1)

            report_step(step, tc, tracker, lr_scheduler, grad_norm, bar, log)  # host sync on log steps
            validate(step, unet=unet if fsdp else accelerator.unwrap_model(unet))
            C.end_of_step(step, cfg, out_dir, state, accelerator, tracker, watch)
        bar.close()
        validate.close()
        watch.close()
        seconds = time.perf_counter() - started
        trained = tc.max_steps - start

        # 3. Save (rank 0): the pipeline with the new (EMA) UNet, and the single-file checkpoint.
        result = TrainResult(
            out_dir=out_dir,
            method="full",
            steps=tc.max_steps,
            final_loss=tracker.last_loss,
            seconds=round(seconds, 3),
            steps_per_sec=round(trained / max(seconds, 1e-9), 3),
            num_processes=world,
            extra={
                "images": len(all_records),
                "uncaptioned": sum(1 for r in all_records if not r.caption),
                "cache_shards": len(shard_paths),
                "cache_shards_written": written,
                "ema": ema is not None,
                "parallelism": "fsdp" if fsdp else "ddp",
                "resumed_from_step": start,
                "attempt": state.attempt,
                "validation_grids": [str(p.relative_to(out_dir)) for p in validate.files],
            },
        )
        weights = P.full_state_dict(unet) if fsdp else None  # a collective: every rank takes part
        if accelerator.is_main_process:
            if fsdp:
                from diffusers import UNet2DConditionModel

                new_unet = UNet2DConditionModel.from_config(unet.config)
                new_unet.load_state_dict(weights)
            else:
                new_unet = accelerator.unwrap_model(unet)
                if ema is not None:
                    ema.copy_to(new_unet.parameters())  # the averaged weights are the model
            new_unet = new_unet.to(torch.float32).eval()
            result.files = save_full_pipeline(cfg, new_unet, out_dir)
            write_run_files(cfg, out_dir, result)
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result
