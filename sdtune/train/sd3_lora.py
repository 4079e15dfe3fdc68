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
from .outputs import LORA_WEIGHTS, TrainResult
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
        cache = encode_records(pipe, session.records, data_dir, cfg, session.device, session.dtype)
        objective = L.FlowMatching(pipe.scheduler, tc)  # at init: num_train_timesteps sigmas, shift applied
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
            lambda: save_transformer_lora(session.plain_models()["transformer"], out_dir),
            check_replicas=True,
            arch="sd3",
            objective="flow_matching",
            timestep_density=tc.timestep_density,
            dora=tc.use_dora,
        )


def encode_records(pipe, records, data_dir: Path, cfg: RunConfig, device, dtype) -> D.EncodedData:
    """VAE latent distributions (fp32 VAE) and SD3 prompt embeddings of this rank's records, once.

    ``prompt_embeds``: [N, 77 + max_sequence_length, joint_attention_dim] (CLIP-L ⊕ CLIP-G penultimate
    states padded to the T5 width, then the T5 states); ``pooled_embeds``: [N, pooled_projection_dim]."""
    paths = [Path(data_dir) / r.file for r in records]
    mean, std = D.encode_image_files(pipe.vae, paths, cfg.preprocess.resolution, device)
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
