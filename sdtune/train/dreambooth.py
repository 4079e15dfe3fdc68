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
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.models.loading import load_components, load_pipeline
from sdtune.tracking import MetricLogger

from . import data as D
from . import losses as L
from .outputs import TrainResult, save_full_pipeline
from .session import Session

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp"}


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Class images for prior preservation (generated once, cached by content).
        class_paths = class_images(cfg, session.accelerator) if tc.with_prior_preservation else []

        # 2. Model and data: instance and class images encoded once.
        parts = load_components(cfg)
        device, dtype = session.device, session.dtype
        instance = D.encode_records(parts, session.records, data_dir, cfg, device, dtype)
        prior, samplers = None, {}
        if class_paths:
            mine = D.shard(class_paths, session.rank, session.world)
            prior = D.encode_files(parts, mine, [class_prompt(cfg)] * len(mine), cfg, device, dtype)
            samplers["class"] = D.EpochSampler(len(prior), tc.batch_size, tc.seed + 7919 + session.rank)
        objective = L.Denoising(parts.noise_scheduler, tc)
        vae_config = parts.vae.config
        del parts.vae, parts.text_encoder, parts.text_encoder_2

        unet = session.trainable_unet(parts.unet)
        params = list(unet.parameters())
        desc = "dreambooth" + (" +prior" if prior is not None else "")
        unet = session.start({"unet": unet}, params, samplers=samplers, sampler="instance", desc=desc)["unet"]

        # 3. Loop: instance batch and class batch go through the UNet together.
        for idx in session.steps():
            latents = D.sample_latents(vae_config, instance, idx, session.draw)
            cond = D.unet_conditioning(instance, idx)
            n = len(idx)
            if prior is not None:
                cidx = next(samplers["class"]).to(device)
                latents = torch.cat([latents, D.sample_latents(vae_config, prior, cidx, session.draw)])
                cond = _cat_conditioning(cond, D.unet_conditioning(prior, cidx))
            noisy, t, target = objective.add_noise(latents, session.draw)
            per_sample = objective.loss(unet(noisy, t, **cond).sample, target, t)
            loss = total = per_sample[:n].mean()
            if prior is not None:
                prior_loss = per_sample[n:].mean()
                total = loss + tc.prior_loss_weight * prior_loss
                session.track("prior_loss", prior_loss)
            session.backward(total, tracked=loss)

        # 4. Save the whole pipeline with the new UNet (rank 0).
        new_unet = session.trained_unet(unet)  # FSDP: gathered from the shards (every rank takes part)
        return session.finish(
            "dreambooth",
            lambda: save_full_pipeline(cfg, new_unet, out_dir),
            class_images=len(class_paths),
            parallelism="fsdp" if session.fsdp else "ddp",
        )


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
