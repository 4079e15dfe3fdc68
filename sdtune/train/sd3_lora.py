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

from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_pipeline
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .adapters import add_lora, to_fp32
from .outputs import TrainResult, save_transformer_lora
from .session import Session


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
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Model and data: the pipeline (fp32), latents and the three encoders' embeddings cached once.
        pipe = load_pipeline(cfg)
        for module in pipe.components.values():
            if isinstance(module, torch.nn.Module):
                module.requires_grad_(False)
        cache = D.encode_records_sd3(pipe, session.records, data_dir, cfg, session.device, session.dtype)
        objective = L.objective_for(cfg, pipe.scheduler)  # at init: num_train_timesteps sigmas, shift applied
        vae_config = pipe.vae.config
        transformer = pipe.transformer
        del pipe  # the VAE and text encoders are no longer needed

        # 2. LoRA adapters on the transformer's attention projections; only they train (fp32).
        transformer = session.place(transformer)
        params = add_lora(transformer, tc, tc.target_modules, use_dora=tc.use_dora)
        to_fp32(params)
        groups = [{"params": params, "lr": tc.learning_rate}]
        models = session.start(
            {"transformer": transformer}, params, groups=groups, desc=f"sd3 lora r{tc.rank}"
        )
        transformer = models["transformer"]

        # 3. Loop: the flow-matching loss on cached latents and prompt embeddings.
        for idx in session.steps():
            latents = D.sample_latents(vae_config, cache, idx, session.draw)
            noisy, t, target = objective.add_noise(latents, session.draw)
            pred = transformer(
                hidden_states=noisy,
                timestep=t,
                encoder_hidden_states=cache.prompt_embeds[idx],
                pooled_projections=cache.pooled_embeds[idx],
                return_dict=False,
            )[0]
            session.backward(objective.loss(pred, target, t).mean())

        # 4. Save (rank 0 only).
        return session.finish(
            "lora",
            lambda out: save_transformer_lora(session.plain_models()["transformer"], out),
            check_replicas=True,
            arch="sd3",
            objective="flow_matching",
            timestep_density=tc.timestep_density,
            dora=tc.use_dora,
        )
