"""Model and training commands: ``models tiny``, ``train``, ``evaluate``, ``plan``.

Heavy imports (torch, diffusers) happen inside the commands so ``sdtune --help`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated

import typer


def quiet_libraries() -> None:
    """Before torch-side imports in train/evaluate/generate: transformers' and diffusers' notices (a
    torchvision fallback, "no LoRA keys for CLIPTextModel", weight-loading bars) say nothing a user can act
    on here. Errors still show; set TRANSFORMERS_VERBOSITY=info to see
    them all. Environment variables, so a training subprocess inherits them."""

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components..."


models_app = typer.Typer(
    help="Base models: build tiny offline ones for tests and the CPU demo.", no_args_is_help=True
)


@models_app.command("tiny")
def models_tiny(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the diffusers pipeline to.")],
    arch: Annotated[
        str, typer.Option("--arch", help="sd15, sd15-inpaint, sd2, sdxl, sdxl-inpaint or sd3.")
    ] = "sd15",
    seed: Annotated[int, typer.Option("--seed")] = 0,
    pretrained: Annotated[
        bool,
        typer.Option("--pretrained", help="The shipped pre-trained weights (sd15, sd15-inpaint) instead."),
    ] = False,
    objective: Annotated[
        str | None,
        typer.Option(
            "--objective",
            help="With --pretrained: the v-prediction base (v, the default) or the earlier ε-prediction one "
            "(epsilon).",
        ),
    ] = None,
) -> None:
    """Write a tiny, seeded, randomly initialised pipeline (~1.7 M parameters) that loads offline.

    Example: sdtune models tiny --arch sd15 --out .sdtune/models/tiny-sd15
    """
    quiet_libraries()
    from sdtune.models.tiny import build_tiny

    path = build_tiny(arch, out, seed=seed, pretrained=pretrained, objective=objective)
    typer.echo(f"wrote tiny {'pre-trained ' if pretrained else ''}{arch} pipeline to {path}")


@models_app.command("pretrain")
def models_pretrain(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the pre-trained pipeline to.")],
    seed: Annotated[int, typer.Option("--seed")] = 0,
    vae_steps: Annotated[int, typer.Option("--vae-steps", min=1)] = 400,
    unet_steps: Annotated[int, typer.Option("--unet-steps", min=1)] = 1200,
    unet_lr: Annotated[float, typer.Option("--unet-lr", min=0.0)] = 3e-3,
    noise_offset: Annotated[float, typer.Option("--noise-offset", min=0.0)] = 0.0,
    v_prediction: Annotated[
        bool,
        typer.Option("--v-prediction/--epsilon", help="What the UNet learns to predict: v or the noise."),
    ] = False,
    zero_terminal_snr: Annotated[
        bool,
        typer.Option(
            "--zero-terminal-snr/--plain-schedule",
            help="Rescale the noise schedule so that t = 999 is pure noise (use with --v-prediction).",
        ),
    ] = False,
    init_from: Annotated[
        Path | None,
        typer.Option(
            "--init-from", help="Continue an earlier result for --unet-steps more (its VAE is kept)."
        ),
    ] = None,
) -> None:
    """Pre-train the tiny SD 1.x on procedural pictures (CPU, about 15 min), check its gates, write a card."""
    from sdtune.models.pretrain import PretrainRecipe, build_pretrained_base

    recipe = PretrainRecipe(
        seed=seed,
        vae_steps=vae_steps,
        unet_steps=unet_steps,
        unet_lr=unet_lr,
        noise_offset=noise_offset,
        prediction_type="v_prediction" if v_prediction else "epsilon",
        zero_terminal_snr=zero_terminal_snr,
        init_from=str(init_from) if init_from else None,
    )
    path = build_pretrained_base(out, recipe, log=typer.echo)
    typer.echo(f"wrote pre-trained tiny sd15 pipeline to {path} (see {path / 'MODEL_CARD.md'})")


def train_command(
    config: Annotated[Path, typer.Option("--config", help="YAML preset (configs/...).")],
    data: Annotated[
        Path, typer.Option("--data", help="Stage directory with manifest.jsonl (captioned images).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder for weights, metrics and summary.")],
    mlflow_run_id: Annotated[
        str | None, typer.Option("--mlflow-run-id", help="Also log metrics to this MLflow run.")
    ] = None,
    overrides: Annotated[
        list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=10")
    ] = None,
) -> None:
    """Train with the method named by train.method (1 process, or N under torchrun).

    Example: sdtune train --config configs/debug/tiny_cpu.yaml --data data/captioned --out out/lora train.max_steps=10
    """
    from sdtune.config import load_config
    from sdtune.data.stagedir import check_out_dir, stage_output
    from sdtune.manifest import require_captions

    cfg = load_config(config, overrides or [])
    require_captions(data)
    check_out_dir(out, "train", inputs=[data])
    quiet_libraries()
    from sdtune.train import run

    logger = None
    if mlflow_run_id and int(os.environ.get("RANK", "0")) == 0:
        from sdtune.tracking import MLflowLogger

        logger = MLflowLogger(mlflow_run_id)
    with stage_output(out):
        result = run(cfg, data, out, logger)
    if int(os.environ.get("RANK", "0")) == 0:
        typer.echo(
            f"trained {result.steps} steps in {result.seconds:.1f}s ({result.steps_per_sec:.2f} steps/s), "
            f"final loss {result.final_loss:.4f} → {out}"
        )


def evaluate_command(
    config: Annotated[Path, typer.Option("--config", help="YAML preset (configs/...).")],
    data: Annotated[
        Path, typer.Option("--data", help="Stage directory (holdout records are used for the loss).")
    ],
    out: Annotated[Path, typer.Option("--out", help="Output folder: metrics.json, grid.png, samples/.")],
    lora: Annotated[Path | None, typer.Option("--lora", help="Training output folder to evaluate.")] = None,
    base_model: Annotated[
        str | None, typer.Option("--base-model", help="Base model (default: model.base from the config).")
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Held-out denoising loss, base vs tuned, and a labelled sample grid.

    Example: sdtune evaluate --config configs/debug/tiny_cpu.yaml --data data/captioned --lora out/lora --out out/eval
    """
    from sdtune.config import load_config
    from sdtune.data.stagedir import check_out_dir, stage_output
    from sdtune.manifest import iter_manifest

    cfg = load_config(config, overrides or [])
    if lora is not None:
        from sdtune.generate import require_training_output

        require_training_output(lora)
    next(iter_manifest(data), None)  # a missing or failed stage folder: one line, before any model loads
    check_out_dir(out, "evaluate", inputs=[data] + ([lora] if lora is not None else []))
    quiet_libraries()
    from sdtune.evaluate import evaluate

    with stage_output(out):
        metrics = evaluate(cfg, base_model or cfg.model.base, lora, data, out)
    typer.echo(json.dumps(metrics, indent=2, sort_keys=True))


def generate_command(
    prompt: Annotated[list[str], typer.Option("--prompt", "-p", help="Prompt (repeat for several).")],
    out: Annotated[Path, typer.Option("--out", help="Folder for the PNGs and grid.png.")],
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Run config: model.base and resolution (a registered model: optional)."
        ),
    ] = None,
    lora: Annotated[
        str | None,
        typer.Option(
            "--lora",
            "--model",
            help="Training output folder (LoRA, embeddings, pivotal, DreamBooth) or models:/NAME@ALIAS.",
        ),
    ] = None,
    negative_prompt: Annotated[
        str, typer.Option("--negative-prompt", "-n", help="What to steer away from.")
    ] = "",
    seeds: Annotated[str, typer.Option("--seeds", help="Comma-separated seeds: one image per seed.")] = "0",
    steps: Annotated[int, typer.Option("--steps", min=1, help="Denoising steps.")] = 25,
    guidance: Annotated[
        float, typer.Option("--guidance", min=0.0, help="Classifier-free guidance scale.")
    ] = 7.5,
    size: Annotated[
        int | None,
        typer.Option("--size", min=8, help="Image side in pixels (default: preprocess.resolution)."),
    ] = None,
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
) -> None:
    """Sample images from the base model, a training output or a registered model, with the parameters
    written into each PNG.

    Example: sdtune generate --config configs/debug/tiny_cpu.yaml --lora out/lora -p "a photo of sks toy robot" --seeds 0,1"""
    from sdtune.config import load_config
    from sdtune.data.stagedir import check_out_dir
    from sdtune.errors import UsageError
    from sdtune.generate import REGISTRY_PREFIX, GenerateRequest, generate

    try:
        seed_list = [int(s) for s in seeds.split(",") if s.strip()]
        if any(not 0 <= s < 2**63 for s in seed_list):
            raise ValueError
    except ValueError:
        raise UsageError(
            f"--seeds {seeds!r}: expected integers from 0 to 2**63-1 separated by commas, e.g. 0,1,2"
        ) from None
    if size is not None and size % 8:
        raise UsageError(f"--size {size}: must be a multiple of 8 (the VAE's downsampling)")
    check_out_dir(out, "generate", inputs=[lora] if lora and not lora.startswith(REGISTRY_PREFIX) else [])
    cfg = load_config(config, overrides or []) if config or overrides else None
    quiet_libraries()
    request = GenerateRequest(list(prompt), seed_list or [0], negative_prompt, steps, guidance, size)
    paths = generate(cfg, request, out, lora)
    typer.echo(f"wrote {len(paths)} image(s) and grid.png to {out}")


def plan_command(
    config: Annotated[Path, typer.Argument(help="YAML preset (configs/...).")],
    overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    gpu: Annotated[
        str,
        typer.Option(
            "--gpu",
            help="a100-40gb, a100-80gb, h100-80gb, h200-141gb, l40s-48gb, l4-24gb, a10-24gb (or h100, l4, …)",
        ),
    ] = "a100-80gb",
    num_gpus: Annotated[
        int | None, typer.Option("--num-gpus", help="GPUs in all (default: train.num_processes).")
    ] = None,
    usd_per_gpu_hour: Annotated[float, typer.Option("--usd-per-gpu-hour")] = 2.0,
    images: Annotated[
        int, typer.Option("--images", help="Training images (the cache stays on the GPUs).")
    ] = 1000,
    mfu: Annotated[
        float | None,
        typer.Option(
            "--mfu",
            help="The GPU's model-FLOPs utilisation while it computes (0-1), measured at a batch that fills it; "
            "replaces the assumed one. The host's kernel-launch floor still applies.",
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan as JSON.")] = False,
) -> None:
    """Parameters, memory per GPU, time and cost of a training config — without touching a GPU.
    Exit 0 when it fits, 1 when it does not (the report names settings that would).

    Example: sdtune plan configs/sdxl/lora_1gpu.yaml --gpu h100"""
    from sdtune.config import load_config
    from sdtune.errors import UsageError
    from sdtune.train.plan import estimate, fitting_settings, gpu_key, report

    for name, value, low, high in (
        ("--num-gpus", num_gpus, 1, None),
        ("--usd-per-gpu-hour", usd_per_gpu_hour, 0, None),
        ("--images", images, 1, None),
        ("--mfu", mfu, 0.01, 1),
    ):
        if value is not None and not (low <= value and (high is None or value <= high)):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            raise UsageError(f"{name} {value}: must be {bounds}")
    cfg = load_config(config, overrides or [])
    gpu = gpu_key(gpu)
    plan = estimate(cfg, gpu, num_gpus, usd_per_gpu_hour, images, mfu)
    if as_json:
        typer.echo(json.dumps(plan.to_json(), indent=2))
    else:
        typer.echo(report(plan))
    if not plan.fits:
        fits = fitting_settings(cfg, gpu, num_gpus, images)
        typer.echo(
            "would fit: "
            + (" | ".join(fits) if fits else "nothing simple: more GPUs with FSDP, or a bigger card"),
            err=True,
        )
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("plan")(plan_command)
    app.command("generate")(generate_command)
