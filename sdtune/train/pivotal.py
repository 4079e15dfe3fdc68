"""Pivotal tuning: textual inversion and a UNet LoRA trained together (the "pivot" is the new token).

Run it::

    sdtune train --config configs/sd15/pivotal_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- New tokens ``<sks>``, ``<sks>_1`` … (``train.num_vectors``, ``initializer_token``) replace the trigger word in
  captions, exactly as in :mod:`.textual_inversion`; only their rows change (checked bit for bit).
- A UNet LoRA (``train.rank``, ``alpha``, ``target_modules``) as in :mod:`.lora`.
- Two learning rates: ``train.embedding_learning_rate`` (default: ``learning_rate``) for the embeddings,
  ``train.learning_rate`` for the LoRA.
- ``train.embedding_train_fraction``: after that fraction of the steps the embeddings freeze and training
  goes on LoRA-only (the usual recipe: ~0.5, so the LoRA adapts to a settled token).
- Same data caching, schedule, accumulation, seeding, logging and multi-process behaviour as :mod:`.lora`.

Writes (rank 0): ``pytorch_lora_weights.safetensors`` + ``lora_kohya.safetensors``, ``learned_embeds.safetensors``
+ ``<trigger>.safetensors``, ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``. Load both:
``pipe.load_textual_inversion(".../learned_embeds.safetensors"); pipe.load_lora_weights("...")``.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import TrainingError
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
from . import embeddings as E
from . import losses as L
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
        # 1. Model: new tokens in every tokenizer/text encoder; only their embedding rows train.
        parts = load_components(cfg)
        dtype = weight_dtype(accelerator)
        tokens = E.concept_tokens(cfg)
        encoders = [(parts.tokenizer, parts.text_encoder)]
        if parts.is_sdxl:
            encoders.append((parts.tokenizer_2, parts.text_encoder_2))
        new_ids, weights, guards = [], [], []
        for tokenizer, encoder in encoders:
            ids = E.add_concept_tokens(tokenizer, encoder, tokens, E.initializer_word(cfg))
            encoder.to(device)
            weight = E.trainable_embeddings(encoder)
            new_ids.append(ids.to(device))
            weights.append(weight)
            guards.append(E.RowGuard.for_embedding(weight, ids))

        # 2. Data: latents cached once; captions tokenized once (with the concept tokens).
        records = D.shard(all_records, rank, world)
        captions = [E.with_concept_tokens(D.caption_of(r, cfg), cfg.caption.trigger, tokens) for r in records]
        pixels = torch.stack([D.load_image(data_dir / r.file, cfg.preprocess.resolution) for r in records])
        latent_mean, latent_std = D.encode_images(parts.vae, pixels, device)
        token_ids = {k: v.to(device) for k, v in D.tokenize_prompts(parts, captions).items()}
        vae_config = parts.vae.config
        del parts.vae
        unet = parts.unet.to(device)
        if dtype != torch.float32:
            unet.to(dtype)
        if tc.gradient_checkpointing:
            unet.enable_gradient_checkpointing()
        scheduler = parts.noise_scheduler
        prediction_type = tc.prediction_type or scheduler.config.prediction_type

        # LoRA on the UNet, as in the LoRA recipe.
        from peft import LoraConfig

        unet.add_adapter(
            LoraConfig(
                r=tc.rank,
                lora_alpha=tc.alpha or tc.rank,
                init_lora_weights="gaussian",
                target_modules=tc.target_modules,
            )
        )
        lora_params = [p for p in unet.parameters() if p.requires_grad]
        for p in lora_params:
            p.data = p.data.float()

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(
            tc,
            [
                {"params": weights, "lr": tc.embedding_learning_rate or tc.learning_rate},
                {"params": lora_params, "lr": tc.learning_rate},
            ],
        )
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        embedding_steps = max(1, round(tc.embedding_train_fraction * tc.max_steps))
        prepared = accelerator.prepare(unet, *[enc for _, enc in encoders], optimizer)
        unet, text_encoders, optimizer = prepared[0], list(prepared[1:-1]), prepared[-1]
        unet.train()
        parts.text_encoder = text_encoders[0]
        if parts.is_sdxl:
            parts.text_encoder_2 = text_encoders[1]
        for enc in text_encoders:
            enc.train()

        # 3. Loop.
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)  # the global batch's noise, this rank's slice
        batches = D.EpochSampler(len(records), tc.batch_size, tc.seed + rank)
        modules = {"unet": accelerator.unwrap_model(unet)}
        modules.update(
            {f"text_encoder_{i}": accelerator.unwrap_model(e) for i, e in enumerate(text_encoders)}
        )
        state = C.TrainState(
            modules=modules,
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
        bar = progress(accelerator, tc.max_steps, f"pivotal x{tc.num_vectors} r{tc.rank}")
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            train_embeddings = step <= embedding_steps  # then LoRA-only: embeddings get no gradient
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches).to(device)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                models = [unet, *text_encoders] if train_embeddings else [unet]
                with contextlib.ExitStack() as stack:
                    if not last_micro:
                        for model in models:
                            stack.enter_context(accelerator.no_sync(model))
                    stack.enter_context(accelerator.autocast())
                    with torch.set_grad_enabled(train_embeddings):
                        cond = D.text_conditioning(
                            parts, {k: v[idx] for k, v in token_ids.items()}, cfg.preprocess.resolution
                        )
                    latents = D.scaled_latents(vae_config, latent_mean[idx], latent_std[idx], draw)
                    noise = L.sample_noise(latents, draw, tc.noise_offset)
                    t = L.sample_timesteps(len(idx), scheduler.config.num_train_timesteps, draw, device)
                    noisy = scheduler.add_noise(latents, noise, t)
                    kwargs = {"encoder_hidden_states": cond["prompt_embeds"].to(dtype)}
                    if "pooled_embeds" in cond:
                        kwargs["added_cond_kwargs"] = {
                            "text_embeds": cond["pooled_embeds"].to(dtype),
                            "time_ids": cond["time_ids"].to(dtype),
                        }
                    pred = unet(noisy.to(dtype), t, **kwargs).sample
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
            grad_norm = accelerator.clip_grad_norm_([*weights, *lora_params], tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            for guard, weight in zip(guards, weights, strict=True):
                guard.restore(weight)  # only the new rows may move
            bar.update(1)

            report_step(
                step,
                tc,
                tracker,
                lr_scheduler,
                grad_norm,
                bar,
                log,
                extra=lambda: {"embedding_norm": float(weights[0].detach()[new_ids[0]].norm(dim=-1).mean())},
            )
            C.end_of_step(step, cfg, out_dir, state, accelerator, tracker, watch)
        bar.close()
        watch.close()
        seconds = time.perf_counter() - started
        trained = tc.max_steps - start

        # 4. Check and save (rank 0).
        if not all(g.unchanged(w) for g, w in zip(guards, weights, strict=True)):
            raise TrainingError("textual inversion changed embedding rows other than the new tokens")
        result = TrainResult(
            out_dir=out_dir,
            method="pivotal",
            steps=tc.max_steps,
            final_loss=tracker.last_loss,
            seconds=round(seconds, 3),
            steps_per_sec=round(trained / max(seconds, 1e-9), 3),
            num_processes=world,
            extra={
                "tokens": tokens,
                "other_embeddings_unchanged": True,
                "embedding_steps": embedding_steps,
                "resumed_from_step": start,
                "attempt": state.attempt,
            },
        )
        if accelerator.is_main_process:
            names = ["clip_l", "clip_g"]
            vectors = {names[i]: w[ids] for i, (w, ids) in enumerate(zip(weights, new_ids, strict=True))}
            result.files = E.save_embeddings(vectors, tokens, out_dir, cfg.caption.trigger)
            result.files += save_unet_lora(accelerator.unwrap_model(unet), out_dir, cfg)
            write_run_files(
                cfg, out_dir, result, prompt=cfg.format_prompt("a photo of <{trigger}> {class_noun}")
            )
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result
