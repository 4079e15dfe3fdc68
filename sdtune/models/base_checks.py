"""The gates a pre-trained tiny base must pass (``tests/models/test_pretrained.py`` runs them on the shipped one).

- :func:`vae_quality`: PSNR of VAE reconstructions (the posterior mean decoded) of held-out procedural
  pictures, and the mean posterior std of their latents (small: the latents carry the picture).
- :func:`colour_accuracy`: pictures sampled from "a {colour} {object} on a {background} background" prompts,
  each labelled by :func:`dominant_colour`, a pixel-statistics classifier (a vote of the pixels by nearest
  named colour, greys and background colours not voting); the share that match the prompt's colour.
- :func:`caption_gap`: held-out denoising loss with the picture's caption ("a photo of a {colour} {object},
  {background} background") vs with the empty caption, same
  noise, mid timesteps (where the caption decides what the picture becomes; near t = 0 the noisy latent
  already shows it, near t = 1000 nothing is left to see).
"""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from sdtune.models import pretrain_data as P

HELD_OUT_SEED = 1_000_003  # never the pre-training seed: these pictures were never trained on
GAP_TIMESTEPS = (300, 400, 500, 600, 700)


def held_out_scenes(count: int, pairs=None) -> tuple[list[P.Scene], list[Image.Image]]:
    rng = random.Random(HELD_OUT_SEED)
    scenes = [P.random_scene(rng, pairs) for _ in range(count)]
    return scenes, [P.render(s, rng) for s in scenes]


@torch.no_grad()
def vae_quality(vae, images: list[Image.Image]) -> dict[str, float]:
    pixels = P.pixels_of(images)
    dist = vae.encode(pixels).latent_dist
    recon = vae.decode(dist.mean).sample.clamp(-1, 1)
    mse = ((recon - pixels) ** 2).mean(dim=(1, 2, 3))
    psnr = 10 * torch.log10(4.0 / mse)  # the pixel range [-1, 1] spans 2
    return {"psnr_db": float(psnr.mean()), "posterior_std": float(dist.std.mean())}


def dominant_colour(image: Image.Image, min_share: float = 0.02) -> str | None:
    """The named colour (:data:`COLOURS`) most pixels are nearest to, counting only pixels nearer to an object
    colour than to any background colour or a neutral grey; ``None`` when fewer than ``min_share`` are."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    names = list(P.COLOURS)
    neutral = [*P.BACKGROUNDS.values(), *[(v, v, v) for v in range(0, 256, 32)]]
    refs = np.array([P.COLOURS[n] for n in names] + neutral, dtype=np.float32)
    nearest = np.argmin(np.linalg.norm(arr[:, None, :] - refs[None], axis=-1), axis=1)
    votes = np.bincount(nearest, minlength=len(refs))[: len(names)]
    if votes.max() < min_share * len(arr):
        return None
    return names[int(np.argmax(votes))]


def gate_prompts(pairs, seeds_per_prompt: int) -> list[tuple[str, str, int]]:
    """(prompt, colour, seed) for each (colour, object) pair on each named background."""
    out = []
    for i, (colour, obj) in enumerate(sorted(pairs)):
        for j, background in enumerate(P.BACKGROUNDS):
            for k in range(seeds_per_prompt):
                out.append((f"a {colour} {obj} on a {background} background", colour, 1000 * i + 10 * j + k))
    return out


@torch.no_grad()
def colour_accuracy(pipe, pairs, seeds_per_prompt: int = 1, steps: int = 25, guidance: float = 3.0) -> float:
    prompts = gate_prompts(pairs, seeds_per_prompt)
    hits = 0
    for start in range(0, len(prompts), 16):
        chunk = prompts[start : start + 16]
        images = pipe(
            [p for p, _, _ in chunk],
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=[torch.Generator().manual_seed(s) for _, _, s in chunk],
            height=32,
            width=32,
        ).images
        hits += sum(dominant_colour(im) == c for im, (_, c, _) in zip(images, chunk, strict=True))
    return hits / len(prompts)


@torch.no_grad()
def caption_gap(
    pipe, scenes: list[P.Scene], images: list[Image.Image], noise_seeds=(0, 1)
) -> dict[str, float]:
    from diffusers import DDPMScheduler

    from sdtune.models.text import tokenize

    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    pixels = P.pixels_of(images)
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    # The caption form pre-training used: a caption that leaves the background out never occurred, and a
    # model that reads the background from its caption is then (rightly) surprised by it.
    captions = [f"a photo of a {s.colour} {s.obj}, {s.background} background" for s in scenes]
    ids = tokenize(pipe.tokenizer, captions)
    with_caption = pipe.text_encoder(ids)[0]
    empty = pipe.text_encoder(tokenize(pipe.tokenizer, [""]))[0].expand_as(with_caption)
    losses = {"caption": 0.0, "empty": 0.0}
    for seed in noise_seeds:
        noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
        for t in GAP_TIMESTEPS:
            tt = torch.full((len(latents),), t, dtype=torch.long)
            noisy = scheduler.add_noise(latents, noise, tt)
            # As train.losses.prediction_target (models/ does not import the training package).
            target = (
                scheduler.get_velocity(latents, noise, tt)
                if scheduler.config.prediction_type == "v_prediction"
                else noise
            )
            for name, cond in (("caption", with_caption), ("empty", empty)):
                pred = pipe.unet(noisy, tt, encoder_hidden_states=cond).sample
                losses[name] += float(((pred - target) ** 2).mean())
    n = len(noise_seeds) * len(GAP_TIMESTEPS)
    out = {f"loss_{k}": v / n for k, v in losses.items()}
    out["gap"] = 1.0 - out["loss_caption"] / out["loss_empty"]
    return out


GATES = {"vae_psnr_db": 20.0, "posterior_std": 0.1, "colour_accuracy": 0.8, "caption_gap": 0.2}


def measure(model_dir) -> dict[str, float]:
    """Every gate's measurement on the pipeline folder ``model_dir`` (about a CPU-minute)."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    every_pair = [(c, o) for c in P.COLOURS for o in P.OBJECTS]
    _, images = held_out_scenes(128, every_pair)
    vae = vae_quality(pipe.vae, images)
    scenes, images = held_out_scenes(64, every_pair)
    gap = caption_gap(pipe, scenes, images)
    return {
        "vae_psnr_db": vae["psnr_db"],
        "posterior_std": vae["posterior_std"],
        "colour_accuracy": colour_accuracy(pipe, every_pair),
        "colour_accuracy_held_out_pairs": colour_accuracy(pipe, sorted(P.HELD_OUT), seeds_per_prompt=2),
        "caption_gap": gap["gap"],
        "loss_with_caption": gap["loss_caption"],
        "loss_with_empty_caption": gap["loss_empty"],
    }


def failed_gates(measured: dict[str, float]) -> list[str]:
    """The gates ``measured`` misses, as readable lines (empty when all pass)."""
    out = []
    for name, bound in GATES.items():
        ok = measured[name] <= bound if name == "posterior_std" else measured[name] >= bound
        if not ok:
            out.append(
                f"{name} = {measured[name]:.4g} (needs {'≤' if name == 'posterior_std' else '≥'} {bound})"
            )
    return out
