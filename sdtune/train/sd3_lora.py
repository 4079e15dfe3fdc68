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
- Text: CLIP-L + CLIP-G + T5 prompt embeddings and the pooled projections, as the pipeline's ``encode_prompt``
  makes them (:func:`.data.text_conditioning`; T5 at ``train.max_sequence_length`` tokens), computed ONCE;
  then the encoders are freed.
- LoRA on the transformer's ``train.target_modules`` (default ``to_q,to_k,to_v,to_out.0``: the joint
  attention's image-stream projections).
- ``train.train_text_encoder``: a LoRA on both CLIP encoders too (``text_encoder_target_modules``, at
  ``text_encoder_lr``); their captions are tokenized once and encoded every step. T5 stays frozen (its states
  are still computed once): diffusers' SD3 loader takes LoRA for the transformer and the two CLIPs only.
- Latents: VAE (16 channels) distribution cached once; each step samples it and applies the VAE's
  ``shift_factor``/``scaling_factor``.

Writes (rank 0): ``pytorch_lora_weights.safetensors`` (``StableDiffusion3Pipeline.save_lora_weights``;
``transformer.`` keys, ``text_encoder.``/``text_encoder_2.`` with ``train_text_encoder``; loads with
``load_lora_weights``; ComfyUI reads these keys too), ``metrics.jsonl``, ``config.yaml``,
``train_summary.json``, ``README.md``, ``checkpoints/``. No kohya file: no SD3 reader of one is at hand to
check it against (docs/methods.md).
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .adapters import add_lora, add_text_encoder_lora, lora_groups, to_fp32
from .outputs import TrainResult, save_lora
from .session import Session


def check_config(cfg: RunConfig) -> None:
    """Refuse the options that belong to the DDPM recipes (one line each, exit 2)."""
    tc = cfg.train
    refused = {
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
        # 1. Model and data: latents and T5 states cached once; the CLIP embeddings too unless CLIP trains.
        parts = load_components(cfg)
        device, dtype, res = session.device, session.dtype, cfg.preprocess.resolution
        paths = [session.data_dir / r.file for r in session.records]
        captions = [D.caption_of(r, cfg) for r in session.records]
        if tc.train_text_encoder:
            cache = D.encode_tokenized(parts, paths, captions, res, device, tc.max_sequence_length)
            encoders = {"text_encoder": parts.text_encoder, "text_encoder_2": parts.text_encoder_2}
        else:
            cache = D.encode_files(parts, paths, captions, cfg, device, dtype)
            encoders = {}
        objective = L.objective_for(cfg, parts.noise_scheduler)  # at init: num_train_timesteps sigmas, shift
        vae_config = parts.vae.config
        parts.vae = parts.text_encoder_3 = None

        # 2. LoRA adapters on the transformer's attention projections (and the CLIPs'); only they train (fp32).
        transformer = session.place(parts.transformer)
        params = add_lora(transformer, tc, tc.target_modules, use_dora=tc.use_dora)
        te_params = add_text_encoder_lora(encoders, tc, device, dtype)
        to_fp32(params + te_params)
        models = session.start(  # the text encoders' gradients averaged by hand, as in the LoRA recipe
            {"transformer": transformer, **encoders},
            params + te_params,
            groups=lora_groups(tc, params, te_params),
            prepare=["transformer"],
            average_grads=te_params,
            desc=f"sd3 lora r{tc.rank}",
        )
        transformer = models["transformer"]

        # 3. Loop: the flow-matching loss on cached latents (the trainable CLIP encoders run every step).
        for idx in session.steps():
            latents = D.sample_latents(vae_config, cache, idx, session.draw)
            noisy, t, target = objective.add_noise(latents, session.draw)
            text = D.text_conditioning(parts, cache.ids(idx), res) if encoders else D.cached_text(cache, idx)
            pred = D.predict(parts, transformer, noisy, t, text, dtype)
            session.backward(objective.loss(pred, target, t).mean())

        # 4. Save (rank 0 only).
        return session.finish(
            "lora",
            lambda out: save_lora(session.plain_models()["transformer"], out, cfg, text_encoders=encoders),
            check_replicas=True,
            arch="sd3",
            objective="flow_matching",
            timestep_density=tc.timestep_density,
            text_encoder_lora=sorted(encoders),
            dora=tc.use_dora,
        )
