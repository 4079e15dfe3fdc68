"""Pre-train the tiny SD 1.x on the procedural domain of :mod:`sdtune.models.pretrain_data`, on a CPU.

``pretrain(out_dir, PretrainRecipe())`` starts from :func:`sdtune.models.tiny.build_tiny`'s random sd15
components (same seed → same start) and trains, in two stages:

1. **VAE** (``vae_steps``, batch ``vae_batch``): pixel MSE (+ ``vae_kl_weight`` × KL, 0 by default), the posterior started narrow,
   so latents carry the image (posterior std small) instead of sampling noise. Its ``scaling_factor`` is then set to 1 / std of the
   latents, as SD's 0.18215 was chosen, so the UNet sees unit-variance latents.
2. **UNet and text encoder together** (``unet_steps``, batch ``unet_batch``): the noise-prediction loss on
   captioned pictures, caption dropped ``caption_dropout`` of the time (classifier-free guidance), AdamW
   without weight decay, linear warm-up then cosine. A frozen random text encoder gives the UNet nothing to
   condition on, so both train.

Tokens no caption used (the trigger ``sks`` among them) keep their random initial rows, which are ~10× shorter
than trained ones and would read as "nothing"; they are rescaled to the trained rows' mean norm, as a real
CLIP's rare tokens have full-size embeddings. The result is saved with a DDIM scheduler whose config says
``clip_sample: false`` (SD 1.5's own setting). The whole pipeline is written every ``checkpoint_every`` UNet
steps, so an interrupted run still leaves a usable model, plus ``pretrain_log.jsonl`` and ``MODEL_CARD.md``.
"""

from __future__ import annotations

import json
import math
import platform
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from sdtune.models import pretrain_data as P


@dataclass
class PretrainRecipe:
    seed: int = 0
    resolution: int = 32
    pool_size: int = 12_000  # pictures drawn once; captions are re-drawn every time a picture is used
    vae_steps: int = 400
    vae_batch: int = 16
    vae_lr: float = 2e-3
    vae_kl_weight: float = 0.0  # 1e-6 widened the posterior past the gate (std 0.05 → 0.12 in 500 steps)
    unet_steps: int = 1200
    unet_batch: int = 32
    unet_lr: float = 3e-3
    warmup_steps: int = 50
    caption_dropout: float = 0.1
    noise_offset: float = 0.0  # as train.noise_offset: lets the UNet move a picture's mean colour
    # "v_prediction" with zero_terminal_snr: an ε-model has nothing to predict at t = 999 (its input is the noise).
    prediction_type: str = "epsilon"
    # Rescale the noise schedule so that t = 999 is pure noise (Lin et al. 2024, "Common Diffusion Noise
    # Schedules and Sample Steps are Flawed"); sampled with "trailing" timesteps.
    zero_terminal_snr: bool = False
    checkpoint_every: int = 200
    # Continue from an earlier result (its VAE is kept: no VAE stage) for ``unet_steps`` more steps.
    init_from: str | None = None


def pretrain(out_dir: Path, recipe: PretrainRecipe, log: Callable[[str], None] = print) -> Path:
    from diffusers import DDIMScheduler, DDPMScheduler, StableDiffusionPipeline

    from sdtune.models import tiny

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.time()
    torch.manual_seed(recipe.seed)
    tokenizer = tiny.write_tokenizer(out_dir / "tokenizer")
    start = tiny.sd15_pipeline(tokenizer, recipe.seed)
    if recipe.init_from:
        start = StableDiffusionPipeline.from_pretrained(recipe.init_from, local_files_only=True)
    vae, unet, text_encoder = start.vae, start.unet, start.text_encoder
    journal = (out_dir / "pretrain_log.jsonl").open("w", encoding="utf-8")

    def note(stage: str, step: int, **values) -> None:
        row = {"stage": stage, "step": step, "elapsed_s": round(time.time() - started, 1), **values}
        journal.write(json.dumps(row) + "\n")
        journal.flush()
        log(json.dumps(row))

    rng = random.Random(recipe.seed)
    scenes = [P.random_scene(rng) for _ in range(recipe.pool_size)]
    pixels = P.pixels_of(P.render(s, rng, recipe.resolution) for s in scenes)
    note("data", 0, pictures=len(scenes))

    # 1. VAE. The posterior starts narrow (log-variance −6, std 0.05): from a random start at std 1 the
    # reconstruction loss narrows it only slowly, and a wide posterior turns the latents into noise.
    vae_steps = 0 if recipe.init_from else recipe.vae_steps
    with torch.no_grad():
        if not recipe.init_from:
            vae.quant_conv.bias[vae.config.latent_channels :] = -6.0
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(recipe.seed)
    for step in range(1, vae_steps + 1):
        for group in optimizer.param_groups:  # cosine to 10 %
            group["lr"] = recipe.vae_lr * (
                0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * step / recipe.vae_steps))
            )
        batch = pixels[torch.randint(len(pixels), (recipe.vae_batch,), generator=gen)]
        dist = vae.encode(batch).latent_dist
        recon = vae.decode(dist.sample(generator=gen)).sample
        mse = torch.nn.functional.mse_loss(recon, batch)
        loss = mse + recipe.vae_kl_weight * dist.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 25 == 0 or step == recipe.vae_steps:
            note("vae", step, mse=round(float(mse), 5), psnr=round(float(10 * math.log10(4 / float(mse))), 2))
    vae.eval().requires_grad_(False)

    with torch.no_grad():
        dists = [vae.encode(pixels[i : i + 256]).latent_dist for i in range(0, len(pixels), 256)]
        means = torch.cat([d.mean for d in dists])
        stds = torch.cat([d.std for d in dists])
    scaling = float(1.0 / means.std()) if not recipe.init_from else vae.config.scaling_factor
    vae.register_to_config(scaling_factor=scaling)
    note("vae_latents", recipe.vae_steps, scaling_factor=round(scaling, 5), posterior_std=float(stds.mean()))

    # 2. UNet + text encoder.
    schedule = {"prediction_type": recipe.prediction_type, "rescale_betas_zero_snr": recipe.zero_terminal_snr}
    if recipe.zero_terminal_snr:
        schedule["timestep_spacing"] = "trailing"
    noise_scheduler = DDPMScheduler.from_config(start.scheduler.config, **schedule)
    unet.train()
    text_encoder.train()
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=0.0)
    used_ids: set[int] = set(tokenizer.all_special_ids)

    def save() -> None:
        _rescale_unused_rows(text_encoder, used_ids)
        pipe = StableDiffusionPipeline(
            unet=unet.eval(),
            vae=vae,
            text_encoder=text_encoder.eval(),
            tokenizer=tokenizer,
            scheduler=DDIMScheduler.from_config(
                start.scheduler.config, clip_sample=False, set_alpha_to_one=False, **schedule
            ),
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
        pipe.save_pretrained(out_dir, safe_serialization=True)
        _forget_source_folder(out_dir)
        unet.train()
        text_encoder.train()

    saved_rows: dict[int, torch.Tensor] = {}
    for step in range(1, recipe.unet_steps + 1):
        if step <= recipe.warmup_steps:
            lr = recipe.unet_lr * step / recipe.warmup_steps
        else:
            progress = (step - recipe.warmup_steps) / max(1, recipe.unet_steps - recipe.warmup_steps)
            lr = recipe.unet_lr * 0.5 * (1 + math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        idx = torch.randint(len(scenes), (recipe.unet_batch,), generator=gen)
        captions = [
            "" if rng.random() < recipe.caption_dropout else P.caption(scenes[i], rng) for i in idx.tolist()
        ]
        ids = tokenizer(
            captions, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt"
        ).input_ids
        used_ids.update(ids.unique().tolist())
        latents = (means[idx] + stds[idx] * torch.randn(means[idx].shape, generator=gen)) * scaling
        noise = torch.randn(latents.shape, generator=gen)
        if recipe.noise_offset:  # as train.noise_offset (models/ does not import the training package)
            noise = noise + recipe.noise_offset * torch.randn((*latents.shape[:2], 1, 1), generator=gen)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        noisy = noise_scheduler.add_noise(latents, noise, t)
        pred = unet(noisy, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        target = (
            noise_scheduler.get_velocity(latents, noise, t)
            if recipe.prediction_type == "v_prediction"
            else noise
        )
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        if step % 25 == 0:
            note("unet", step, loss=round(loss.item(), 5), lr=round(lr, 6))
        if step % recipe.checkpoint_every == 0 or step == recipe.unet_steps:
            with torch.no_grad():
                saved_rows = _snapshot(text_encoder, saved_rows)
                save()
                _restore(text_encoder, saved_rows)
            _write_meta(out_dir, recipe, step, time.time() - started)
            note("checkpoint", step)
    with torch.no_grad():
        save()
    journal.close()
    _write_meta(out_dir, recipe, recipe.unet_steps, time.time() - started)
    return out_dir


def _forget_source_folder(out_dir: Path) -> None:
    """A continued run's components remember the folder they were loaded from; the result must not name it."""
    for config in (out_dir / "unet" / "config.json", out_dir / "vae" / "config.json"):
        values = json.loads(config.read_text(encoding="utf-8"))
        if values.pop("_name_or_path", None) is not None:
            config.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _rescale_unused_rows(text_encoder, used_ids: set[int]) -> None:
    """Give never-trained token rows the mean norm of the trained ones (their directions stay random)."""
    with torch.no_grad():
        table = text_encoder.get_input_embeddings().weight
        used = torch.zeros(table.shape[0], dtype=torch.bool)
        used[sorted(used_ids)] = True
        target = table[used].norm(dim=-1).mean()
        rows = table[~used]
        table[~used] = rows / rows.norm(dim=-1, keepdim=True) * target


def _snapshot(text_encoder, _previous) -> dict[int, torch.Tensor]:
    # The rescale is for the saved model only: training continues from the untouched rows.
    return {0: text_encoder.get_input_embeddings().weight.detach().clone()}


def _restore(text_encoder, rows: dict[int, torch.Tensor]) -> None:
    text_encoder.get_input_embeddings().weight.data.copy_(rows[0])


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


STAGE_KEYS = ("recipe", "unet_steps_done", "seconds", "hardware", "torch")


def earlier_stages(init_from: str | None) -> list[dict]:
    """The build record of the result a run continues (its own earlier stages first), so that the card of a
    continued base still says how the whole of it was made."""
    record = Path(init_from or "") / "sdtune_tiny.json"
    if not init_from or not record.is_file():
        return []
    meta = json.loads(record.read_text(encoding="utf-8"))
    return [*meta.get("earlier_stages", []), {k: meta[k] for k in STAGE_KEYS if k in meta}]


def _write_meta(out_dir: Path, recipe: PretrainRecipe, steps_done: int, seconds: float) -> None:
    meta = {
        "arch": "sd15",
        "seed": recipe.seed,
        "pretrained": True,
        "recipe": asdict(recipe),
        "unet_steps_done": steps_done,
        "seconds": round(seconds, 1),
        "hardware": f"{_cpu_name()}, torch threads {torch.get_num_threads()}",
        "torch": torch.__version__,
        "earlier_stages": earlier_stages(recipe.init_from),
    }
    (out_dir / "sdtune_tiny.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_pretrained_base(out_dir: Path, recipe: PretrainRecipe, log: Callable[[str], None] = print) -> Path:
    """:func:`pretrain`, then measure the gates (:mod:`sdtune.models.base_checks`) and write ``MODEL_CARD.md``."""
    pretrain(out_dir, recipe, log)
    write_model_card(Path(out_dir))
    return Path(out_dir)


def weight_digests(model_dir: Path) -> dict[str, str]:
    import hashlib

    return {
        str(p.relative_to(model_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(Path(model_dir).rglob("*.safetensors"))
    }


def build_commands(recipes: list[dict], name: str = "tiny-sd15-pretrained") -> str:
    """The command lines that rebuild the shipped base ``name`` from its stages' recipes (= its make target)."""
    out = f"sdtune/assets/{name}"
    make_target = "pretrained-base" + name.removeprefix("tiny-sd15-pretrained")
    lines = []
    for i, r in enumerate(recipes):
        target = out if i == len(recipes) - 1 else f".sdtune/pretrain-stage{i + 1}"
        v_pred = r.get("prediction_type", "epsilon") == "v_prediction"
        flags = (" --v-prediction" if v_pred else " --epsilon") + (
            " --zero-terminal-snr" if r.get("zero_terminal_snr", False) else " --plain-schedule"
        )
        start = (
            f" \\\n        --init-from .sdtune/pretrain-stage{i}" if i else f" --vae-steps {r['vae_steps']}"
        )
        lines.append(
            f"    sdtune models pretrain --out {target} --seed {r['seed']} \\\n"
            f"        --unet-steps {r['unet_steps']}{flags}{start}"
        )
    return "\n".join(lines) + f"      # = make {make_target}"


def write_model_card(model_dir: Path) -> dict[str, float]:
    from sdtune.models import base_checks

    meta = json.loads((model_dir / "sdtune_tiny.json").read_text(encoding="utf-8"))
    measured = base_checks.measure(model_dir)
    meta["gates"] = {k: round(v, 4) for k, v in measured.items()}
    (model_dir / "sdtune_tiny.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    r = meta["recipe"]
    held_out = ", ".join(f"{c} {o}" for c, o in sorted(P.HELD_OUT))
    failed = {line.split(" ")[0] for line in base_checks.failed_gates(measured)}
    rows = "\n".join(
        f"| {name} | {measured[name]:.4g} | {'≤' if name == 'posterior_std' else '≥'} {bound} | "
        f"{'NOT MET' if name in failed else 'met'} |"
        for name, bound in base_checks.GATES.items()
    )
    extra = "\n".join(f"| {k} | {v:.4g} | – | – |" for k, v in measured.items() if k not in base_checks.GATES)
    verdict = (
        "All gates are met."
        if not failed
        else f"Gates not met: {', '.join(sorted(failed))}. docs/evaluation.md says what was tried and measured."
    )
    digests = "\n".join(f"    {sha}  {name}" for name, sha in weight_digests(model_dir).items())
    v_pred = r.get("prediction_type", "epsilon") == "v_prediction"
    objective = "v-prediction (the UNet predicts v = √ᾱ·ε − √(1−ᾱ)·x₀)" if v_pred else "ε-prediction"
    zero_snr = r.get("zero_terminal_snr", False)
    schedule = (
        ", betas rescaled to zero terminal SNR (t = 999 is pure noise), `timestep_spacing: trailing`"
        if zero_snr
        else ""
    )
    stages = [*meta.get("earlier_stages", []), meta]
    commands = build_commands([stage["recipe"] for stage in stages], model_dir.name)
    unet_steps = sum(stage["recipe"]["unet_steps"] for stage in stages)
    minutes = sum(stage["seconds"] for stage in stages) / 60
    card = f"""# {model_dir.name}

A tiny Stable Diffusion 1.x (sdtune's tiny sizes: UNet (32, 64), 2-block VAE, 2-layer CLIP text encoder,
~1.7 M parameters) pre-trained by sdtune on a CPU, on procedurally drawn, captioned {r["resolution"]} px
pictures. It exists so that fine-tuning tests and the local demo can see a subject being learned; it knows
nothing about real images.

## How it was built

{commands}

- Start: `sdtune models tiny --arch sd15 --seed {r["seed"]}`'s random components.
- Data (`sdtune/models/pretrain_data.py`, seed {r["seed"]}): {r["pool_size"]} pictures, each one object
  (circle, square, triangle, toy robot) in one of {len(P.COLOURS)} colours ({", ".join(P.COLOURS)}), posed like
  the sample subject, on a named background ({", ".join(P.BACKGROUNDS)}); every caption names colour, object
  and background, colour first ("red square, gray background", "a photo of a red square, gray background").
  Never drawn: the colour/object pairs {held_out}, and the sample dataset's robot (orange body, teal
  head, white star); the trigger word never appears in a caption.
- VAE: {r["vae_steps"]} steps, batch {r["vae_batch"]}, AdamW LR {r["vae_lr"]} (cosine to 10 %), MSE +
  {r["vae_kl_weight"]} × KL; scaling factor set to 1 / latent std.
- UNet + text encoder together: {unet_steps} steps{f" in {len(stages)} runs of {r['unet_steps']}" if len(stages) > 1 else ""},
  batch {r["unet_batch"]}, AdamW LR {r["unet_lr"]} (no weight decay), {r["warmup_steps"]} warm-up steps then
  cosine{" in each run" if len(stages) > 1 else ""}, caption dropped {r["caption_dropout"]:.0%}, noise offset {r.get("noise_offset", 0.0)}.
  Token rows no caption used are rescaled to the trained rows' mean norm.
- Objective: {objective}.
- Scheduler: DDIM, `clip_sample: false`{schedule}.
- Took {minutes:.0f} min on {meta["hardware"]} (torch {meta["torch"]}), sharing 2 cores.

## Gates (held-out pictures; checked by tests/models/test_pretrained.py)

| measure | value | gate | status |
|---|---|---|---|
{rows}
{extra}

{verdict}

PSNR: VAE reconstruction of 128 unseen pictures. Colour accuracy: DDIM 25 steps, guidance 3, 32 px, prompts
"a {{colour}} {{object}} on a {{background}} background", a pixel-vote classifier. Caption gap: denoising
loss with "a photo of a {{colour}} {{object}}, {{background}} background" (the training form) vs the empty caption, t = 300…700, 64 unseen pictures.

## sha256 of the weights

{digests}
"""
    (model_dir / "MODEL_CARD.md").write_text(card, encoding="utf-8")
    return measured
