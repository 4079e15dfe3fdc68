"""``sdtune generate``: try a model with your own prompts, seeds, steps and guidance.

The model is the base (``model.base``) alone, the base with a training output applied (LoRA, textual
inversion, pivotal tuning, or a DreamBooth/full fine-tune's own pipeline folder), or a registered version
(``models:/NAME@champion``: its training output and config come from the MLflow registry). Every image is a
PNG whose text chunks hold the parameters that made it: ``parameters`` in the A1111 form (prompt, then
``Negative prompt:``, then ``Steps: …, CFG scale: …, Seed: …, Size: …``), which A1111's "PNG Info" and
ComfyUI read, and ``sdtune`` as JSON. ``grid.png`` shows prompts across and seeds down.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtune.config import RunConfig, config_from_yaml
from sdtune.errors import ConfigError, UsageError
from sdtune.train.outputs import CONFIG, EMBEDDINGS, LORA_WEIGHTS

REGISTRY_PREFIX = "models:/"
TRAINING_OUTPUTS = (LORA_WEIGHTS, EMBEDDINGS, "model_index.json")


@dataclass
class GenerateRequest:
    prompts: list[str]
    seeds: list[int] = field(default_factory=lambda: [0])
    negative_prompt: str = ""
    steps: int = 25
    guidance: float = 7.5
    size: int | None = None  # default: the config's training resolution


def generate(
    cfg: RunConfig | None, request: GenerateRequest, out_dir: Path, model: str | None = None
) -> list[Path]:
    """Write one PNG per prompt × seed, and ``grid.png``, to ``out_dir``; return the image paths.

    ``model``: a training output folder, ``models:/NAME@ALIAS`` (or ``models:/NAME/VERSION``), or None for
    the base model alone. ``cfg``: the run config (base model, resolution); for a registered model, None
    takes the config it was trained with."""
    if not request.prompts:
        raise UsageError("give at least one --prompt")
    with tempfile.TemporaryDirectory() as tmp:
        if model and model.startswith(REGISTRY_PREFIX):
            registered_cfg, model_dir = fetch_registered(model, Path(tmp))
            cfg = cfg or registered_cfg
            label = model
        else:
            model_dir = Path(model) if model else None
            label = str(model_dir) if model_dir else "base"
            if cfg is None:
                raise UsageError("give --config (its model.base is the model to sample)")
        if model_dir is not None:
            require_training_output(model_dir)
        pipe = _pipeline(cfg, model_dir)
        return _render(pipe, cfg, request, Path(out_dir), label)


def fetch_registered(uri: str, into: Path) -> tuple[RunConfig, Path]:
    """Download a registered version; return its run config and its training output folder."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from sdtune import tracking

    tracking.mlflow_client()  # points MLflow at the configured store
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    except MlflowException as exc:
        raise UsageError(f"{uri}: {str(exc).splitlines()[0]}") from None
    # The training output travels as it is inside the registered version, with its resolved config.
    for config in sorted(local.rglob(CONFIG)):
        folder = config.parent
        if any((folder / name).is_file() for name in TRAINING_OUTPUTS):
            return config_from_yaml(config.read_text(encoding="utf-8")), folder
    raise UsageError(f"{uri} was not registered by sdtune (no training output with its {CONFIG} in it)")


def require_training_output(folder: Path) -> None:
    if not folder.is_dir():
        raise ConfigError(f"{folder}: no such folder")
    if not any((folder / name).is_file() for name in TRAINING_OUTPUTS):
        raise ConfigError(f"{folder}: not a training output (no {', '.join(TRAINING_OUTPUTS)})")


def _pipeline(cfg: RunConfig, model_dir: Path | None) -> Any:
    import warnings

    import torch

    from sdtune.models.loading import load_pipeline

    # MLflow advises type hints on the registry's pyfunc wrapper when the class is defined; it sets its own
    # filter around that check, so only muting the display works. catch_warnings restores it.
    with warnings.catch_warnings():
        warnings.showwarning = lambda *args, **kwargs: None
        from sdtune.registry import load_trained_pipeline

    pipe = load_trained_pipeline(cfg, model_dir) if model_dir is not None else load_pipeline(cfg)
    return pipe.to("cuda" if torch.cuda.is_available() else "cpu")


def _render(pipe: Any, cfg: RunConfig, request: GenerateRequest, out_dir: Path, label: str) -> list[Path]:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from sdtune.evaluate import make_grid

    out_dir.mkdir(parents=True, exist_ok=True)
    size = request.size or cfg.preprocess.resolution
    paths: list[Path] = []
    rows: dict[str, list] = {f"seed {seed}": [] for seed in request.seeds}
    for p, prompt in enumerate(request.prompts):
        for seed in request.seeds:
            image = pipe(
                prompt,
                negative_prompt=request.negative_prompt or None,
                num_inference_steps=request.steps,
                guidance_scale=request.guidance,
                height=size,
                width=size,
                generator=torch.Generator("cpu").manual_seed(seed),
            ).images[0]
            params = {
                **asdict(request),
                "prompt": prompt,
                "seed": seed,
                "size": size,
                "model": label,
                "base": cfg.model.base,
                "scheduler": type(pipe.scheduler).__name__,
            }
            del params["prompts"], params["seeds"]
            info = PngInfo()
            info.add_text("parameters", a1111_parameters(params))
            info.add_text("sdtune", json.dumps(params, sort_keys=True))
            path = out_dir / f"{p:02d}-seed{seed}.png"
            image.save(path, pnginfo=info)
            paths.append(path)
            rows[f"seed {seed}"].append(image)
    make_grid(rows, request.prompts).save(out_dir / "grid.png")
    return paths


def a1111_parameters(params: dict[str, Any]) -> str:
    """The ``parameters`` text A1111 writes (and its PNG Info tab and ComfyUI read back)."""
    lines = [params["prompt"]]
    if params.get("negative_prompt"):
        lines.append(f"Negative prompt: {params['negative_prompt']}")
    lines.append(
        f"Steps: {params['steps']}, Sampler: {params['scheduler']}, CFG scale: {params['guidance']}, "
        f"Seed: {params['seed']}, Size: {params['size']}x{params['size']}, Model: {params['base']}, "
        f"Tuned: {params['model']}"
    )
    return "\n".join(lines)
