"""DreamBooth: fine-tune the whole UNet on the subject, with prior preservation against language drift.

Run it::

    sdtune train --config configs/sd15/dreambooth_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- The whole UNet trains (text encoder and VAE frozen); AdamW, schedule, accumulation, seeding, logging and
  multi-process behaviour as in :mod:`.lora`. Use ``gradient_checkpointing`` and bf16 on real models.
- ``train.with_prior_preservation`` (default on): each step also denoises class images captioned
  ``train.class_prompt`` ("a photo of {class_noun}"), loss = instance + ``prior_loss_weight`` × class.
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

import hashlib
import json
import time
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.loading import load_components, load_pipeline
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
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

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


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
        # 1. Class images for prior preservation (generated once, cached by content).
        class_paths: list[Path] = []
        if tc.with_prior_preservation:
            class_paths = class_images(cfg, accelerator)

        # 2. Model and data: instance and class images encoded once.
        parts = load_components(cfg)
        dtype = weight_dtype(accelerator)
        records = D.shard(all_records, rank, world)
        instance = D.encode_records(parts, records, data_dir, cfg, device, dtype)
        prior = None
        if class_paths:
            mine = D.shard(class_paths, rank, world)
            prior = D.encode_files(parts, mine, [class_prompt(cfg)] * len(mine), cfg, device, dtype)
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
            P.apply_fsdp(unet)  # before the optimizer: its parameters become this rank's shards
        params = list(unet.parameters())

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(tc, params)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        if not fsdp:  # DDP replica (or one process)
            unet, optimizer = accelerator.prepare(unet, optimizer)
        unet.train()
        validate = Validator(cfg, out_dir, log, accelerator, all_ranks=fsdp)  # FSDP forwards are collectives

        # 3. Loop: instance batch and class batch go through the UNet together.
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)  # the global batch's noise, this rank's slice
        batches = D.EpochSampler(len(instance), tc.batch_size, tc.seed + rank)
        samplers = {"instance": batches}
        class_batches = None
        if prior is not None:
            class_batches = samplers["class"] = D.EpochSampler(
                len(prior), tc.batch_size, tc.seed + 7919 + rank
            )
        state = C.TrainState(
            modules={"unet": unet if fsdp else accelerator.unwrap_model(unet)},
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            generators={"noise": gen},
            samplers=samplers,
            scaler=accelerator.scaler,
            fsdp=fsdp,
            data_fingerprint=C.data_fingerprint(all_records),
        )
        start = C.load(found, state, accelerator) if found else 0
        tracker = LossTracker(accelerator, names=[r.file for r in records])
        tracker.last_loss = state.last_loss
        prior_tracker = LossTracker(accelerator)
        bar = progress(accelerator, tc.max_steps, "dreambooth" + (" +prior" if prior is not None else ""))
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches).to(device)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                with P.maybe_no_sync(unet, accelerator, last_micro), accelerator.autocast():
                    latents = D.scaled_latents(
                        vae_config, instance.latent_mean[idx], instance.latent_std[idx], draw
                    )
                    cond = D.unet_conditioning(instance, idx)
                    n = len(idx)
                    if prior is not None:
                        cidx = next(class_batches).to(device)
                        class_latents = D.scaled_latents(
                            vae_config, prior.latent_mean[cidx], prior.latent_std[cidx], draw
                        )
                        latents = torch.cat([latents, class_latents])
                        cond = _cat_conditioning(cond, D.unet_conditioning(prior, cidx))
                    noise = L.sample_noise(latents, draw, tc.noise_offset)
                    t = L.sample_timesteps(
                        latents.shape[0], scheduler.config.num_train_timesteps, draw, device
                    )
                    noisy = scheduler.add_noise(latents, noise, t)
                    pred = unet(noisy, t, **cond).sample
                    target = L.prediction_target(scheduler, latents, noise, t, prediction_type)
                    per_sample = L.diffusion_loss(
                        pred,
                        target,
                        timesteps=t,
                        scheduler=scheduler,
                        snr_gamma=tc.snr_gamma,
                        prediction_type=prediction_type,
                    )
                    loss = per_sample[:n].mean()
                    total = loss
                    if prior is not None:
                        prior_loss = per_sample[n:].mean()
                        total = loss + tc.prior_loss_weight * prior_loss
                        prior_tracker.add(prior_loss, step)
                    accelerator.backward(total / tc.gradient_accumulation_steps)
                tracker.add(loss, step, idx)
            grad_norm = P.clip_grad_norm(unet, params, accelerator, tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            report_step(
                step,
                tc,
                tracker,
                lr_scheduler,
                grad_norm,
                bar,
                log,
                extra=None
                if prior is None
                else lambda step=step: {"prior_loss": prior_tracker.flush(step)["loss"]},
            )
            validate(step, unet=unet if fsdp else accelerator.unwrap_model(unet))
            C.end_of_step(step, cfg, out_dir, state, accelerator, tracker, watch)
        bar.close()
        validate.close()
        watch.close()
        seconds = time.perf_counter() - started
        trained = tc.max_steps - start

        # 4. Save the whole pipeline with the new UNet (rank 0).
        result = TrainResult(
            out_dir=out_dir,
            method="dreambooth",
            steps=tc.max_steps,
            final_loss=tracker.last_loss,
            seconds=round(seconds, 3),
            steps_per_sec=round(trained / max(seconds, 1e-9), 3),
            num_processes=world,
            extra={
                "class_images": len(class_paths),
                "parallelism": "fsdp" if fsdp else "ddp",
                "resumed_from_step": start,
                "attempt": state.attempt,
                "validation_grids": [str(p.relative_to(out_dir)) for p in validate.files],
            },
        )
        weights = P.full_state_dict(unet) if fsdp else None  # a collective: every rank takes part
        if accelerator.is_main_process:
            if fsdp:  # a plain UNet from the gathered weights
                from diffusers import UNet2DConditionModel

                new_unet = UNet2DConditionModel.from_config(unet.config)
                new_unet.load_state_dict(weights)
            else:
                new_unet = accelerator.unwrap_model(unet)
            new_unet = new_unet.to(torch.float32).eval()
            result.files = save_full_pipeline(cfg, new_unet, out_dir)
            write_run_files(cfg, out_dir, result)
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result


def _cat_conditioning(a: dict, b: dict) -> dict:
    out = {"encoder_hidden_states": torch.cat([a["encoder_hidden_states"], b["encoder_hidden_states"]])}
    if "added_cond_kwargs" in a:
        out["added_cond_kwargs"] = {
            k: torch.cat([a["added_cond_kwargs"][k], b["added_cond_kwargs"][k]])
            for k in a["added_cond_kwargs"]
        }
    return out


def class_prompt(cfg: RunConfig) -> str:
    return cfg.format_prompt(cfg.train.class_prompt)


def class_images_key(cfg: RunConfig) -> str:
    """Everything that determines the generated class images, hashed."""
    from sdtune.models.loading import resolve_base

    source = resolve_base(cfg.model.base, cfg.model.cache_dir, cfg.model.revision)
    weights = Path(source) / "unet"
    fingerprint = source
    if weights.is_dir():  # a local folder: its UNet bytes, not its path, name the model
        fingerprint = hashlib.sha256(
            b"".join(p.read_bytes() for p in sorted(weights.glob("*.safetensors")))
        ).hexdigest()
    spec = {
        "model": fingerprint,
        "revision": cfg.model.revision,
        "arch": cfg.model.arch,
        "prompt": class_prompt(cfg),
        "n": cfg.train.num_class_images,
        "res": cfg.preprocess.resolution,
        "steps": cfg.train.class_image_steps,
        "seed": cfg.train.seed,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]


def class_images(cfg: RunConfig, accelerator) -> list[Path]:
    """Supplied class images, or generated ones (each rank makes its share; cached by content)."""
    tc = cfg.train
    if tc.class_data_dir:
        supplied = sorted(p for p in Path(tc.class_data_dir).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if len(supplied) >= tc.num_class_images:
            return supplied[: tc.num_class_images]
    folder = Path(cfg.model.cache_dir).parent / "class-images" / class_images_key(cfg)
    names = [folder / f"class_{i:05d}.png" for i in range(tc.num_class_images)]
    if not (folder / ".complete").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        todo = [
            i
            for i in range(accelerator.process_index, tc.num_class_images, accelerator.num_processes)
            if not names[i].is_file()
        ]
        if todo:
            _generate(cfg, accelerator.device, [(i, names[i]) for i in todo])
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            (folder / ".complete").write_text(
                json.dumps({"prompt": class_prompt(cfg), "n": len(names)}) + "\n"
            )
        accelerator.wait_for_everyone()
    return names


@torch.no_grad()
def _generate(cfg: RunConfig, device, jobs: list[tuple[int, Path]], batch: int = 4) -> None:
    dtype = torch.float32 if device.type != "cuda" else torch.float16
    pipe = load_pipeline(cfg, torch_dtype=dtype).to(device)
    prompt = class_prompt(cfg)
    res = cfg.preprocess.resolution
    for start in range(0, len(jobs), batch):
        chunk = jobs[start : start + batch]
        images = pipe(
            [prompt] * len(chunk),
            num_inference_steps=cfg.train.class_image_steps,
            generator=[torch.Generator("cpu").manual_seed(cfg.train.seed * 100003 + i) for i, _ in chunk],
            height=res,
            width=res,
        ).images
        for (_, path), image in zip(chunk, images, strict=True):
            tmp = path.with_suffix(".tmp.png")
            image.save(tmp)
            tmp.replace(path)
    del pipe
