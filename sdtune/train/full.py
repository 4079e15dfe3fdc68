"""Full fine-tune of the UNet on a large captioned catalogue (the 8×A100 case) — the recipe, top to bottom.

Run it::

    sdtune train --config configs/sd15/full_1gpu.yaml --data DIR --out DIR
    torchrun --standalone --nproc_per_node 8 -m sdtune.cli train --config configs/sd15/full_8xa100-80gb.yaml \\
        --data DIR --out DIR train.num_processes=8

Features (config key → behaviour; the rest as in :mod:`.dreambooth`, without prior preservation):

- The family's denoiser and objective (SD3: the transformer, flow matching; no single file for it).
- Text-to-image objective over every ``train`` record with its OWN caption (the catalogue's captions, e.g.
  from the data stage's sharded output); records without one fall back to ``caption.template`` and are
  counted in the summary (``uncaptioned``).
- Latents and text embeddings cached to disk in shards (:mod:`.latent_cache`:
  ``<out>/cache/latents-NNNNN.safetensors``, each rank its own, no collectives while caching, reused when
  unchanged) and read back a batch at a time, so memory stays flat however large the catalogue.
- ``train.use_ema`` / ``ema_decay``: an exponential moving average of the UNet weights (diffusers
  ``EMAModel``), checkpointed with the rest, and what is saved at the end. Under FSDP it is built from the
  sharded parameters, so each rank averages only its own shards (1/N of the EMA memory); checkpoints and
  the saved model gather it whole.
- ``train.parallelism``: ``ddp`` or ``fsdp`` (FSDP2 over the UNet, :mod:`.parallel`), as in DreamBooth.
- ``train.validation_every``: step-tagged grids (:mod:`.validation`).

Writes (rank 0): a diffusers pipeline folder (``model_index.json``, ``unet/`` …), and with
``train.export_single_file`` (default) ``model.safetensors`` in the original SD layout
(:mod:`.single_file`); ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.families import family_of
from sdtune.models.loading import load_components
from sdtune.tracking import MetricLogger

from . import data as D
from . import latent_cache as LC
from . import losses as L
from .outputs import TrainResult, save_full_pipeline
from .session import Session


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Model; this rank's records encoded into disk shards (reused when unchanged), read a batch at a time.
        parts = load_components(cfg)
        rank, world = session.rank, session.world
        shard_paths, written = LC.build(
            parts, session.records, data_dir, cfg, session.out_dir / "cache", rank, world, session.device
        )
        cache = LC.ShardedLatents(shard_paths, session.device, session.dtype)
        objective = L.objective_for(cfg, parts.noise_scheduler)
        vae_config = parts.vae.config
        parts.vae = parts.text_encoder = parts.text_encoder_2 = parts.text_encoder_3 = None

        name = family_of(cfg).denoiser  # the UNet, or SD3's transformer
        unet = session.trainable_unet(parts.denoiser)
        params = list(unet.parameters())
        ema = None
        if tc.use_ema:
            from diffusers.training_utils import EMAModel

            ema = EMAModel(params, decay=tc.ema_decay)
            ema.to(session.device)
        unet = session.start({name: unet}, params, ema=ema, desc="full" + (" +ema" if ema else ""))[name]

        # 2. Loop: each micro-batch's rows read from the disk shards.
        for idx in session.steps(index_on_device=False):
            batch = cache.batch(idx)
            all_rows = torch.arange(len(idx), device=session.device)
            latents = D.scaled_latents(vae_config, batch.latent_mean, batch.latent_std, session.draw)
            noisy, t, target = objective.add_noise(latents, session.draw)
            pred = D.predict(parts, unet, noisy, t, D.cached_text(batch, all_rows), session.dtype)
            session.backward(objective.loss(pred, target, t).mean())

        # 3. Save (rank 0): the pipeline with the new (EMA) UNet, and the single-file checkpoint.
        new_unet = session.trained_unet(unet)  # FSDP: gathered from the shards (every rank takes part)
        return session.finish(
            "full",
            lambda out: save_full_pipeline(cfg, new_unet, out),
            images=len(session.all_records),
            uncaptioned=sum(1 for r in session.all_records if not r.caption),
            cache_shards=len(shard_paths),
            cache_shards_written=written,
            ema=ema is not None,
            parallelism="fsdp" if session.fsdp else "ddp",
        )
