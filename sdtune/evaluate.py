"""Evaluate a training run against its base model: held-out denoising loss and a labelled sample grid.

``evaluate(cfg, base_model, lora_dir, data_dir, out_dir)``:

- **Loss.** For the held-out records (``split == "holdout"``; the train records when there are none, which
  ``metrics.json`` says under ``loss_split``), the denoising MSE of base and tuned UNet at the fixed seeds
  ``evaluate.loss_seeds`` and timesteps ``evaluate.loss_timesteps``, conditioned on the trigger prompt
  ("a photo of {trigger} {class_noun}") and on the class prompt ("a photo of {class_noun}"). The same
  noise is used for both models. Keys: ``loss_{base,tuned}_{trigger,class}`` and ``loss_delta_{trigger,class}``
  (tuned − base; negative means the tuned model denoises the subject better). A healthy run lowers the
  trigger loss a lot more than the class loss (the class prompt drifting too is "language drift").
  Relative changes ``loss_change_{trigger,class}`` (tuned / base − 1) and their difference, **specificity**
  (``loss_change_class − loss_change_trigger``: how many points more the trigger loss fell), with the seed
  spread ``loss_change_{trigger,class}_spread`` (std of the change over ``loss_seeds``), and two model-free
  references on the same noise, ``loss_ref_zero`` and ``loss_ref_variance`` (:mod:`sdtune.subject_metrics`).
  SD3 (``model.arch: sd3``): the flow-matching loss instead — x_σ = (1 − σ)·x0 + σ·noise with
  σ = t / num_train_timesteps for each ``loss_timesteps`` entry, MSE of the transformer's velocity against
  noise − x0 (``loss_objective`` in ``metrics.json`` says which).
- **Samples.** ``evaluate.prompts`` × ``evaluate.seeds`` for the base model (top row) and the tuned model
  (bottom row), same seeds per column: ``samples/{base,tuned}/p{i}_s{seed}.png`` and ``grid.png``.
- **Image metric.** ``evaluate.image_metric_samples`` pictures from the trigger prompt and from the class
  prompt, base and tuned, against the held-out views: ``image_distance_{base,tuned}_{trigger,class}`` (hue
  histogram distance of the saturated pixels, 0 = same colours) and ``image_closer_{trigger,class}`` (1 − tuned / base: how much
  closer to the subject fine-tuning brought the samples). A personalised model brings its trigger samples
  much closer and its class samples much less.

``lora_dir`` is a training output folder: a LoRA (``pytorch_lora_weights.safetensors``), textual-inversion
embeddings (``learned_embeds.safetensors``), both, or a full diffusers pipeline (``model_index.json``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw, ImageFont

from sdtune.config import RunConfig
from sdtune.evaluate_inpaint import InpaintProbe, is_inpainting, vae_roundtrip
from sdtune.manifest import read_manifest
from sdtune.models.loading import SDComponents, load_pipeline
from sdtune.subject_metrics import flow_reference_losses, hue_distance, reference_losses
from sdtune.train import data as D
from sdtune.train.losses import diffusion_loss, prediction_target

TRIGGER_PROMPT = "a photo of {trigger} {class_noun}"
CLASS_PROMPT = "a photo of {class_noun}"


def evaluate(
    cfg: RunConfig, base_model: str, lora_dir: Path | None, data_dir: Path, out_dir: Path
) -> dict[str, float]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = _eval_dtype(cfg, device)

    records = [r for r in read_manifest(data_dir) if r.split == "holdout"]
    loss_split = "holdout"
    if not records:
        records, loss_split = [r for r in read_manifest(data_dir) if r.split == "train"], "train"
    prompts = {"trigger": cfg.format_prompt(TRIGGER_PROMPT), "class": cfg.format_prompt(CLASS_PROMPT)}

    pipe = load_pipeline(cfg, base_model, torch_dtype=dtype).to(device)
    metrics: dict[str, float] = {}
    rows: dict[str, list[Image.Image]] = {}
    latents = _encode_latents(pipe, records, data_dir, cfg, device)
    views = [training_view(Path(data_dir) / r.file, cfg.preprocess.resolution) for r in records]
    # An inpainting model is evaluated on the views with the subject masked (sdtune.evaluate_inpaint).
    probe = InpaintProbe.of(views, cfg.evaluate.image_metric_samples) if is_inpainting(pipe) else None
    extra = probe.unet_channels(pipe, device) if probe else None
    base_losses = _denoising_losses(pipe, latents, prompts, cfg, device, extra)
    for name, per_seed in base_losses.items():
        metrics[f"loss_base_{name}"] = sum(per_seed) / len(per_seed)
    metrics.update({f"loss_ref_{k}": v for k, v in _reference_losses(pipe, latents, cfg).items()})
    base_pictures: dict[str, list[Image.Image]] = {}
    for name, prompt in prompts.items():
        base_pictures[name], metrics[f"image_distance_base_{name}"] = _image_metric(
            pipe, prompt, cfg, device, views, probe
        )
    roundtrip = vae_roundtrip(pipe, views) if probe else []
    if probe:
        rows["masked"] = [probe.shown_input()] * len(cfg.evaluate.prompts) * len(cfg.evaluate.seeds)
    rows["base"] = _samples(pipe, cfg, device, out_dir / "samples" / "base", probe)

    if lora_dir is not None:
        pipe, token = _load_tuned(pipe, cfg, Path(lora_dir), dtype)
        pipe = pipe.to(device)
        # A learned token (textual inversion, pivotal) stands in for the trigger word in the tuned prompts.
        tuned_cfg = (
            cfg.model_copy(update={"caption": cfg.caption.model_copy(update={"trigger": token})})
            if token
            else cfg
        )
        tuned_prompts = {
            k: tuned_cfg.format_prompt(v) for k, v in (("trigger", TRIGGER_PROMPT), ("class", CLASS_PROMPT))
        }
        tuned_pictures: dict[str, list[Image.Image]] = {}
        for name, per_seed in _denoising_losses(pipe, latents, tuned_prompts, cfg, device, extra).items():
            value = sum(per_seed) / len(per_seed)
            metrics[f"loss_tuned_{name}"] = value
            metrics[f"loss_delta_{name}"] = value - metrics[f"loss_base_{name}"]
            metrics[f"loss_change_{name}"] = value / metrics[f"loss_base_{name}"] - 1.0
            changes = [t / b - 1.0 for t, b in zip(per_seed, base_losses[name], strict=True)]
            metrics[f"loss_change_{name}_spread"] = (
                float(torch.tensor(changes).std()) if len(changes) > 1 else 0.0
            )
            tuned_pictures[name], distance = _image_metric(
                pipe, tuned_prompts[name], cfg, device, views, probe
            )
            metrics[f"image_distance_tuned_{name}"] = distance
            metrics[f"image_closer_{name}"] = 1.0 - distance / max(
                metrics[f"image_distance_base_{name}"], 1e-9
            )
        metrics["specificity"] = metrics["loss_change_class"] - metrics["loss_change_trigger"]
        rows["tuned"] = _samples(pipe, tuned_cfg, device, out_dir / "samples" / "tuned", probe)
        if probe:
            metrics.update(probe.metrics(base_pictures["trigger"], tuned_pictures["trigger"], roundtrip))

    metrics["loss_records"] = float(len(records))
    metrics["loss_on_train_records"] = float(loss_split == "train")
    labels = [f"{cfg.format_prompt(p)} | seed {s}" for p in cfg.evaluate.prompts for s in cfg.evaluate.seeds]
    make_grid(rows, labels).save(out_dir / "grid.png")
    info: dict[str, Any] = {
        **metrics,
        "loss_split": loss_split,
        "loss_objective": "flow_matching" if cfg.model.arch == "sd3" else "denoising",
        "loss_prompts": prompts,
        "base_model": str(base_model),
        "tuned": str(lora_dir) if lora_dir is not None else None,
    }
    if loss_split == "train":
        info["note"] = "no holdout records: the loss is measured on training images (optimistic)"
    (out_dir / "metrics.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return metrics


def _eval_dtype(cfg: RunConfig, device: torch.device) -> torch.dtype:
    if device.type != "cuda":
        return torch.float32
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(cfg.train.mixed_precision, torch.float32)


def _components(pipe) -> SDComponents:
    return SDComponents(
        source="",
        unet=pipe.unet,
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        noise_scheduler=pipe.scheduler,
        text_encoder_2=getattr(pipe, "text_encoder_2", None),
        tokenizer_2=getattr(pipe, "tokenizer_2", None),
    )


@torch.no_grad()
def _encode_latents(pipe, records, data_dir: Path, cfg: RunConfig, device) -> torch.Tensor:
    """Deterministic latents (the distribution's mean) of the loss images, scaled for the UNet."""
    pixels = torch.stack([D.load_image(Path(data_dir) / r.file, cfg.preprocess.resolution) for r in records])
    vae = pipe.vae
    means = [
        vae.encode(pixels[i : i + 8].to(device, vae.dtype)).latent_dist.mean for i in range(0, len(pixels), 8)
    ]
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    return ((torch.cat(means).float() - shift) * vae.config.scaling_factor).to(device)


@torch.no_grad()
def _denoising_losses(
    pipe, latents: torch.Tensor, prompts: dict[str, str], cfg: RunConfig, device, extra=None
) -> dict[str, list[float]]:
    """``{prompt name: [mean loss over the timesteps, one per loss seed]}``. ``extra``: input channels the UNet
    takes after the noisy latents (an inpainting UNet's mask and masked-image latents)."""
    if cfg.model.arch == "sd3":
        return _flow_losses(pipe, latents, prompts, cfg, device)
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    prediction_type = scheduler.config.prediction_type
    num_t = scheduler.config.num_train_timesteps
    timesteps = _loss_timesteps(cfg, num_t)
    parts = _components(pipe)
    n = latents.shape[0]
    out: dict[str, float] = {}
    for name, prompt in prompts.items():
        if hasattr(pipe, "maybe_convert_prompt"):
            prompt = pipe.maybe_convert_prompt(prompt, pipe.tokenizer)  # "<sks>" → "<sks> <sks>_1 …"
        cond = D.encode_prompts(parts, [prompt], device, cfg.preprocess.resolution)
        kwargs: dict[str, Any] = {
            "encoder_hidden_states": cond["prompt_embeds"].repeat(n, 1, 1).to(pipe.unet.dtype)
        }
        if "pooled_embeds" in cond:
            kwargs["added_cond_kwargs"] = {
                "text_embeds": cond["pooled_embeds"].repeat(n, 1).to(pipe.unet.dtype),
                "time_ids": cond["time_ids"].repeat(n, 1).to(pipe.unet.dtype),
            }
        out[name] = []
        for seed in cfg.evaluate.loss_seeds:
            noise = _noise(latents, seed, device)
            total = 0.0
            for t in timesteps:
                tt = torch.full((n,), t, device=device, dtype=torch.long)
                noisy = scheduler.add_noise(latents, noise, tt)
                if extra is not None:
                    noisy = torch.cat([noisy, extra], dim=1)
                pred = pipe.unet(noisy.to(pipe.unet.dtype), tt, **kwargs).sample
                target = prediction_target(scheduler, latents, noise, tt, prediction_type)
                total += float(diffusion_loss(pred, target).mean())
            out[name].append(total / len(timesteps))
    return out


def _noise(latents: torch.Tensor, seed: int, device) -> torch.Tensor:
    """The loss noise for ``seed``: drawn on the CPU, so base, tuned and references see the same numbers."""
    return torch.randn(latents.shape, generator=torch.Generator(device="cpu").manual_seed(seed)).to(device)


def _loss_timesteps(cfg: RunConfig, num_t: int) -> list[int]:
    return sorted({min(max(int(t), 0), num_t - 1) for t in cfg.evaluate.loss_timesteps})


@torch.no_grad()
def _reference_losses(pipe, latents: torch.Tensor, cfg: RunConfig) -> dict[str, float]:
    """The model-free references, averaged over the loss seeds like the models' losses."""
    totals: dict[str, float] = {}
    for seed in cfg.evaluate.loss_seeds:
        noise = _noise(latents, seed, latents.device).float()
        if cfg.model.arch == "sd3":
            num_t = pipe.scheduler.config.num_train_timesteps
            sigmas = sorted({min(max(int(t), 1), num_t) / num_t for t in cfg.evaluate.loss_timesteps})
            refs = flow_reference_losses(latents.float(), noise, sigmas)
        else:
            from diffusers import DDPMScheduler

            scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
            timesteps = _loss_timesteps(cfg, scheduler.config.num_train_timesteps)
            refs = reference_losses(
                latents.float(), noise, scheduler.alphas_cumprod, timesteps, scheduler.config.prediction_type
            )
        for k, v in refs.items():
            totals[k] = totals.get(k, 0.0) + v / len(cfg.evaluate.loss_seeds)
    return totals


def training_view(path: Path, resolution: int) -> Image.Image:
    """A held-out view as the model sees it (resized and centre-cropped like the training images)."""
    pixels = D.load_image(path, resolution)
    return Image.fromarray(
        ((pixels.permute(1, 2, 0).numpy() + 1) * 127.5).round().clip(0, 255).astype("uint8")
    )


@torch.no_grad()
def _metric_samples(pipe, prompt: str, cfg: RunConfig, device) -> list[Image.Image]:
    """``evaluate.image_metric_samples`` pictures of ``prompt`` (seeds 0…n-1, in batches of 8)."""
    n = cfg.evaluate.image_metric_samples
    res = cfg.preprocess.resolution
    images: list[Image.Image] = []
    for start in range(0, n, 8):
        seeds = range(start, min(n, start + 8))
        images += pipe(
            [prompt] * len(seeds),
            num_inference_steps=cfg.evaluate.num_inference_steps,
            guidance_scale=cfg.evaluate.guidance_scale,
            generator=[torch.Generator(device="cpu").manual_seed(s) for s in seeds],
            height=res,
            width=res,
        ).images
    return images


def _image_metric(pipe, prompt: str, cfg: RunConfig, device, views, probe) -> tuple[list[Image.Image], float]:
    """Pictures of ``prompt`` and their hue distance to the held-out ``views``: samples, or with an inpainting
    ``probe`` the views with the subject's box repainted (the distance then counts the painted pixels only)."""
    ev = cfg.evaluate
    if probe is None:
        samples = _metric_samples(pipe, prompt, cfg, device)
        return samples, hue_distance(samples, views)
    painted = probe.paint(pipe, prompt, ev.num_inference_steps, ev.guidance_scale)
    return painted, probe.inside_distance(painted)


@torch.no_grad()
def _flow_losses(
    pipe, latents: torch.Tensor, prompts: dict[str, str], cfg: RunConfig, device
) -> dict[str, list[float]]:
    """SD3: the flow-matching velocity MSE at σ = t / num_train_timesteps, same noise for base and tuned."""
    from sdtune.train.losses import flow_noisy, flow_target

    num_t = pipe.scheduler.config.num_train_timesteps
    sigmas = sorted({min(max(int(t), 1), num_t) / num_t for t in cfg.evaluate.loss_timesteps})
    n = latents.shape[0]
    dtype = pipe.transformer.dtype
    out: dict[str, float] = {}
    for name, prompt in prompts.items():
        embeds, _, pooled, _ = pipe.encode_prompt(
            prompt=prompt,
            prompt_2=None,
            prompt_3=None,
            device=device,
            do_classifier_free_guidance=False,
            max_sequence_length=cfg.train.max_sequence_length,
        )
        out[name] = []
        for seed in cfg.evaluate.loss_seeds:
            noise = _noise(latents, seed, device)
            total = 0.0
            for sigma in sigmas:
                s = torch.full((n,), sigma, device=device)
                pred = pipe.transformer(
                    hidden_states=flow_noisy(latents, noise, s).to(dtype),
                    timestep=s * num_t,
                    encoder_hidden_states=embeds.repeat(n, 1, 1).to(dtype),
                    pooled_projections=pooled.repeat(n, 1).to(dtype),
                    return_dict=False,
                )[0]
                total += float(diffusion_loss(pred, flow_target(latents, noise)).mean())
            out[name].append(total / len(sigmas))
    return out


def _load_tuned(pipe, cfg: RunConfig, tuned_dir: Path, dtype: torch.dtype):
    """Apply a training output to the base pipeline (or load it whole, for a full fine-tune).

    Returns ``(pipeline, learned token or None)``."""
    from sdtune.train.embeddings import load_into_pipeline

    if (tuned_dir / "model_index.json").is_file():
        return load_pipeline(cfg, str(tuned_dir), torch_dtype=dtype), None
    token = None
    embeds = tuned_dir / "learned_embeds.safetensors"
    if embeds.is_file():
        token = load_into_pipeline(pipe, embeds)
    has_lora = (tuned_dir / "pytorch_lora_weights.safetensors").is_file()
    if has_lora:
        pipe.load_lora_weights(str(tuned_dir))
    if token is None and not has_lora:
        from sdtune.errors import SdtuneError

        raise SdtuneError(f"{tuned_dir}: no LoRA, embeddings or pipeline to evaluate")
    return pipe, token


@torch.no_grad()
def _samples(pipe, cfg: RunConfig, device, folder: Path, probe=None) -> list[Image.Image]:
    """``evaluate.prompts`` × ``evaluate.seeds`` in one batch; each image's generator seeded on its own. With an
    inpainting ``probe``: its first view with the subject's box repainted."""
    folder.mkdir(parents=True, exist_ok=True)
    pairs = [
        (i, cfg.format_prompt(p), s) for i, p in enumerate(cfg.evaluate.prompts) for s in cfg.evaluate.seeds
    ]
    generators = [torch.Generator(device="cpu").manual_seed(s) for _, _, s in pairs]
    res = cfg.preprocess.resolution
    pictures = (
        {"image": [probe.views[0]] * len(pairs), "mask_image": [probe.masks[0]] * len(pairs)} if probe else {}
    )
    images = pipe(
        [p for _, p, _ in pairs],
        **pictures,
        num_inference_steps=cfg.evaluate.num_inference_steps,
        guidance_scale=cfg.evaluate.guidance_scale,
        generator=generators,
        height=res,
        width=res,
    ).images
    for (i, _, seed), image in zip(pairs, images, strict=True):
        image.save(folder / f"p{i}_s{seed}.png")
    return images


def make_grid(rows: dict[str, list[Image.Image]], labels: list[str], min_cell: int = 160) -> Image.Image:
    """Rows of images with a row label on the left and a wrapped column label on top."""
    font = ImageFont.load_default()
    first = next(iter(rows.values()))[0]
    cell = max(min_cell, first.width)
    header, gutter = 44, 56
    grid = Image.new("RGB", (gutter + cell * len(labels), header + cell * len(rows)), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(labels):
        draw.multiline_text((gutter + c * cell + 4, 4), _wrap(label, cell // 6), fill="black", font=font)
    for r, (name, images) in enumerate(rows.items()):
        draw.text((4, header + r * cell + cell // 2 - 6), name, fill="black", font=font)
        for c, image in enumerate(images):
            resample = Image.Resampling.NEAREST if image.width < cell else Image.Resampling.LANCZOS
            grid.paste(image.resize((cell, cell), resample), (gutter + c * cell, header + r * cell))
    return grid


def _wrap(text: str, width: int) -> str:
    lines, line = [], ""
    for word in text.split():
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    lines.append(line)
    return "\n".join(lines[:3])
