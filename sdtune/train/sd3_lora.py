"""LoRA fine-tuning of the SD3 MMDiT transformer with the flow-matching objective — the recipe, top to bottom.

Selected by ``train.method: lora`` with ``model.arch: sd3`` (:func:`sdtune.train.run`). Run it::

    sdtune train --config configs/sd3/lora_1gpu.yaml --data DIR --out DIR

Same shape and guarantees as :mod:`sdtune.train.lora` (checkpoints and bit-exact resume, SIGTERM → exit 75,
non-finite loss → exit 3, data sharded by rank, global-batch random draws), with SD3's differences:

- Objective: rectified flow. x_σ = (1 − σ)·x0 + σ·noise, the transformer predicts the velocity noise − x0,
  plain MSE (loss weighting "none"). σ and its timestep come from the ``FlowMatchEulerDiscreteScheduler``
  tables (its ``shift`` included) at an index drawn from ``train.timestep_density`` (``logit_normal`` with
  ``logit_mean``/``logit_std``, or ``uniform``). ``prediction_type``/``snr_gamma``/``noise_offset`` are
  DDPM options and are refused.
- Text: CLIP-L + CLIP-G + T5 prompt embeddings and the pooled projections, computed ONCE with the pipeline's
  own ``encode_prompt`` (T5 at ``train.max_sequence_length`` tokens), then all three encoders are freed.
- LoRA on the transformer's ``train.target_modules`` (default ``to_q,to_k,to_v,to_out.0``: the joint
  attention's image-stream projections). Text-encoder LoRA is not supported for SD3 yet (refused).
- Latents: VAE (16 channels) distribution cached once; each step samples it and applies the VAE's
  ``shift_factor``/``scaling_factor``.

Writes (rank 0): ``pytorch_lora_weights.safetensors`` (``StableDiffusion3Pipeline.save_lora_weights``;
``transformer.`` keys; loads with ``load_lora_weights``), ``metrics.jsonl``, ``config.yaml``,
``train_summary.json``, ``README.md``, ``checkpoints/``. No kohya file for SD3 yet.
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_pipeline
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import data as D
from . import losses as L
from .outputs import LORA_WEIGHTS, TrainResult, write_run_files
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


def check_config(cfg: RunConfig) -> None:
    """Refuse the options that belong to the DDPM recipes (one line each, exit 2)."""
    tc = cfg.train
    refused = {
        "train.train_text_encoder": tc.train_text_encoder,
        "train.prediction_type": tc.prediction_type,
        "train.snr_gamma": tc.snr_gamma,
        "train.noise_offset": tc.noise_offset,
    }
    for key, value in refused.items():
        if value:
            raise ConfigError(f"{key}={value} is not supported for model.arch=sd3 (flow matching LoRA)")


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    check_config(cfg)
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
        # 1. Model and data: the pipeline (fp32), latents and the three encoders' embeddings cached once.
        pipe = load_pipeline(cfg)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        dtype = weight_dtype(accelerator)
        records = D.shard(all_records, rank, world)
        cache = encode_records(pipe, records, data_dir, cfg, device, dtype)
        scheduler = pipe.scheduler  # at init: num_train_timesteps sigmas, shift applied
        vae_config = pipe.vae.config
        transformer = pipe.transformer.to(device)
        del pipe  # the VAE and text encoders are no longer needed

        # 2. LoRA adapters on the transformer's attention projections; only they train (fp32).
        from peft import LoraConfig

        if dtype != torch.float32:
            transformer.to(dtype)
        transformer.add_adapter(
            LoraConfig(
                r=tc.rank,
                lora_alpha=tc.alpha or tc.rank,
                init_lora_weights="gaussian",
                target_modules=tc.target_modules,
                use_dora=tc.use_dora,
            )
        )
        params = [p for p in transformer.parameters() if p.requires_grad]
        for p in params:
            p.data = p.data.float()
        if tc.gradient_checkpointing:
            transformer.enable_gradient_checkpointing()

        from diffusers.optimization import get_scheduler

        optimizer = make_optimizer(tc, [{"params": params, "lr": tc.learning_rate}])
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        transformer, optimizer = accelerator.prepare(transformer, optimizer)
        transformer.train()
        validate = Validator(cfg, out_dir, log, accelerator)

        # 3. Loop: one optimizer step per `step`, over `gradient_accumulation_steps` micro-batches; every rank
        # draws the randomness of the global batch and keeps its slice (data.GlobalDraw).
        gen = torch.Generator(device=device).manual_seed(tc.seed * 1000)
        draw = D.GlobalDraw(gen, rank, world)
        batches = D.EpochSampler(len(cache), tc.batch_size, tc.seed + rank)
        state = C.TrainState(
            modules={"transformer": accelerator.unwrap_model(transformer)},
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
        bar = progress(accelerator, tc.max_steps, f"sd3 lora r{tc.rank}")
        bar.update(start)
        started = time.perf_counter()
        for step in range(start + 1, tc.max_steps + 1):
            for micro in range(tc.gradient_accumulation_steps):
                idx = next(batches).to(device)
                last_micro = micro == tc.gradient_accumulation_steps - 1
                sync = contextlib.nullcontext() if last_micro else accelerator.no_sync(transformer)
                with sync, accelerator.autocast():
                    latents = D.scaled_latents(
                        vae_config, cache.latent_mean[idx], cache.latent_std[idx], draw
                    )
                    noise = L.sample_noise(latents, draw)
                    t, sigmas = L.sample_flow_timesteps(
                        len(idx), scheduler, draw, device, tc.timestep_density, tc.logit_mean, tc.logit_std
                    )
                    noisy = L.flow_noisy(latents, noise, sigmas)
                    pred = transformer(
                        hidden_states=noisy,
                        timestep=t,
                        encoder_hidden_states=cache.prompt_embeds[idx],
                        pooled_projections=cache.pooled_embeds[idx],
                        return_dict=False,
                    )[0]
                    loss = L.diffusion_loss(pred, L.flow_target(latents, noise)).mean()
                    accelerator.backward(loss / tc.gradient_accumulation_steps)
                tracker.add(loss, step, idx)
            grad_norm = accelerator.clip_grad_norm_(params, tc.max_grad_norm)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            bar.update(1)

            report_step(step, tc, tracker, lr_scheduler, grad_norm, bar, log)  # host sync on log steps
            validate(step, transformer=accelerator.unwrap_model(transformer))
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
                "arch": "sd3",
                "objective": "flow_matching",
                "timestep_density": tc.timestep_density,
                "resumed_from_step": start,
                "attempt": state.attempt,
                "dora": tc.use_dora,
                "validation_grids": [str(p.relative_to(out_dir)) for p in validate.files],
            },
        )
        same = replicas_identical(accelerator.unwrap_model(transformer), accelerator)
        if same is not None:
            result.extra["replicas_identical"] = same
        if accelerator.is_main_process:
            result.files = save_transformer_lora(accelerator.unwrap_model(transformer), out_dir)
            write_run_files(cfg, out_dir, result)
    finally:
        watch.close()
        if log is not None:
            log.close()
    shutdown(accelerator)
    return result


def encode_records(pipe, records, data_dir: Path, cfg: RunConfig, device, dtype) -> D.EncodedData:
    """VAE latent distributions (fp32 VAE) and SD3 prompt embeddings of this rank's records, once.

    ``prompt_embeds``: [N, 77 + max_sequence_length, joint_attention_dim] (CLIP-L ⊕ CLIP-G penultimate
    states padded to the T5 width, then the T5 states); ``pooled_embeds``: [N, pooled_projection_dim]."""
    res = cfg.preprocess.resolution
    pixels = torch.stack([D.load_image(Path(data_dir) / r.file, res) for r in records])
    mean, std = D.encode_images(pipe.vae, pixels, device)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        getattr(pipe, name).to(device)
    with torch.no_grad():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=[D.caption_of(r, cfg) for r in records],
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=cfg.train.max_sequence_length,
        )
    return D.EncodedData(
        latent_mean=mean.to(dtype),
        latent_std=std.to(dtype),
        prompt_embeds=embeds.float().to(dtype),
        pooled_embeds=pooled.float().to(dtype),
    )


def save_transformer_lora(transformer, out_dir: Path) -> list[str]:
    """The diffusers-format LoRA (``transformer.`` keys, adapter config as metadata so alpha ≠ rank loads)."""
    from diffusers import StableDiffusion3Pipeline
    from peft.utils import get_peft_model_state_dict

    StableDiffusion3Pipeline.save_lora_weights(
        out_dir,
        transformer_lora_layers=get_peft_model_state_dict(transformer),
        transformer_lora_adapter_metadata=transformer.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return [LORA_WEIGHTS]
