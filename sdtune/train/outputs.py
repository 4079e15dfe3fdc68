"""What a training run leaves in its output folder: weights, resolved config, summary, model card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtune.config import RunConfig
from sdtune.models.families import family_of

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
KOHYA_LORA = "lora_kohya.safetensors"
EMBEDDINGS = "learned_embeds.safetensors"
MODEL_CARD = "README.md"
SUMMARY = "train_summary.json"
METRICS = "metrics.jsonl"
CONFIG = "config.yaml"


@dataclass
class TrainResult:
    out_dir: Path
    method: str
    steps: int
    final_loss: float
    seconds: float
    steps_per_sec: float
    num_processes: int = 1
    files: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)  # method-specific facts (tokens, checks, …)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def pipeline_class(arch: str, inpaint: bool = False):
    """The diffusers pipeline class of the family of ``arch`` (SD 1.x/2.x inpainting: the inpaint pipeline)."""
    import diffusers

    from sdtune.models.families import FAMILIES

    name = FAMILIES[arch].pipeline
    if inpaint and name == "StableDiffusionPipeline":
        name = "StableDiffusionInpaintPipeline"
    return getattr(diffusers, name)


def save_lora(denoiser, out_dir: Path, cfg: RunConfig, text_encoders: dict | None = None) -> list[str]:
    """Diffusers-format LoRA of the UNet (SD3: the transformer, ``transformer.`` keys), with the adapter configs
    as metadata so alpha ≠ rank loads right, and, when ``train.export_kohya``, the family has a kohya layout
    (SD 1.x/2.x, SDXL) and the adapter is no DoRA (kohya's format cannot hold one), the same weights in
    kohya/A1111/ComfyUI format. ``text_encoders``: ``{"text_encoder": module, "text_encoder_2": module}`` with
    LoRA adapters (``train.train_text_encoder``). Returns the file names."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    family = family_of(cfg)
    peft_state = get_peft_model_state_dict(denoiser)
    lora_config = denoiser.peft_config["default"]
    layers = peft_state if family.denoiser == "transformer" else convert_state_dict_to_diffusers(peft_state)
    kwargs: dict = {
        f"{family.denoiser}_lora_layers": layers,
        f"{family.denoiser}_lora_adapter_metadata": lora_config.to_dict(),
    }
    kohya_parts = {"unet": (peft_state, lora_config.lora_alpha)}
    for name, encoder in (text_encoders or {}).items():
        te_state = get_peft_model_state_dict(encoder)
        te_config = encoder.peft_config["default"]
        kwargs[f"{name}_lora_layers"] = convert_state_dict_to_diffusers(te_state)
        kwargs[f"{name}_lora_adapter_metadata"] = te_config.to_dict()
        kohya_parts[name] = (te_state, te_config.lora_alpha)
    pipeline_class(cfg.model.arch).save_lora_weights(out_dir, safe_serialization=True, **kwargs)
    files = [LORA_WEIGHTS]
    layout = family.kohya_layout
    if cfg.train.option("export_kohya") and not cfg.train.option("use_dora") and layout is not None:
        from .export import save_kohya_lora

        meta = {
            "ss_base_model_version": cfg.model.arch,
            "ss_network_dim": str(lora_config.r),
            "ss_network_alpha": str(lora_config.lora_alpha),
            "sdtune_trigger": cfg.caption.trigger,
        }
        save_kohya_lora(kohya_parts, out_dir / KOHYA_LORA, meta, sdxl=layout == "sdxl")
        files.append(KOHYA_LORA)
    return files


def save_full_pipeline(cfg: RunConfig, unet, out_dir: Path, **text_encoders) -> list[str]:
    """The base pipeline with the trained ``unet`` (SD3: transformer; and ``text_encoder=``/``text_encoder_2=``
    when they trained) as a diffusers folder (``from_pretrained``), plus ``model.safetensors`` in the original SD
    layout (``from_single_file``, A1111, ComfyUI) when ``train.export_single_file`` and the architecture has a
    writer (SD 1.x, 2.x, SDXL). Returns the file names."""
    from sdtune.models.loading import load_pipeline

    pipe = load_pipeline(cfg, **{family_of(cfg).denoiser: unet}, **text_encoders)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    files = ["model_index.json"]
    if cfg.train.option("export_single_file") and family_of(cfg).single_file:
        from .single_file import SINGLE_FILE, save_single_file

        save_single_file(pipe, out_dir / SINGLE_FILE)
        files.append(SINGLE_FILE)
    return files


def write_run_files(cfg: RunConfig, out_dir: Path, result: TrainResult, prompt: str | None = None) -> None:
    """``config.yaml``, ``train_summary.json`` and the model card ``README.md``."""
    cfg = cfg.storable()  # these files are stored: logged to MLflow, registered, shared with the weights
    (out_dir / CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    (out_dir / SUMMARY).write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
    (out_dir / MODEL_CARD).write_text(model_card(cfg, result, prompt=prompt), encoding="utf-8")


HOW_TO_LOAD = {
    LORA_WEIGHTS: 'pipe.load_lora_weights("{dir}")',
    KOHYA_LORA: 'AUTOMATIC1111 / ComfyUI `models/Lora/`, or pipe.load_lora_weights("{dir}", weight_name="{file}")',
    EMBEDDINGS: 'pipe.load_textual_inversion("{dir}/{file}")',
    "model_index.json": '{pipeline}.from_pretrained("{dir}")',
    "model.safetensors": "AUTOMATIC1111 / ComfyUI `models/Stable-diffusion/`, or "
    '{pipeline}.from_single_file("{dir}/{file}", config="{dir}")',
}
# A pipeline without diffusers' textual-inversion loader (SD3) gets the rows the way transformers documents it.
EMBEDDINGS_WITHOUT_LOADER = (
    'sdtune.train.embeddings.load_into_pipeline(pipe, "{dir}/{file}"), then write every token in the prompt'
)


def model_card(
    cfg: RunConfig, result: TrainResult, metrics: dict[str, float] | None = None, prompt: str | None = None
) -> str:
    """A Markdown model card: base model, method, trigger, example prompt, hyperparameters, metrics."""
    tc = cfg.train
    prompt = prompt or cfg.format_prompt("a photo of {trigger} {class_noun}")
    hyper = {
        "steps": tc.max_steps,
        "batch size (per process)": tc.batch_size,
        "processes": result.num_processes,
        "gradient accumulation": tc.gradient_accumulation_steps,
        "learning rate": tc.learning_rate,
        "lr schedule": f"{tc.lr_scheduler} (warmup {tc.lr_warmup_steps})",
        "resolution": cfg.preprocess.resolution,
        "mixed precision": result.extra.get("mixed_precision", tc.mixed_precision),
        "seed": tc.seed,
    }
    if tc.method in ("lora", "pivotal"):
        hyper.update(
            {
                "LoRA rank": tc.rank,
                "LoRA alpha": tc.alpha or tc.rank,
                "LoRA targets": ", ".join(tc.target_modules),
            }
        )
    if tc.method in ("textual_inversion", "pivotal"):
        hyper.update({"vectors per token": tc.num_vectors})
    if tc.snr_gamma:
        hyper["min-SNR gamma"] = tc.snr_gamma
    lines = [
        "---",
        f"base_model: {cfg.model.base}",
        "library_name: diffusers",
        "tags: [stable-diffusion, text-to-image, sdtune, " + tc.method.replace("_", "-") + "]",
        f"instance_prompt: {prompt}",
        "---",
        "",
        f"# {cfg.name}",
        "",
        f"A **{tc.method.replace('_', ' ')}** fine-tune of `{cfg.model.base}` ({cfg.model.arch}) made with sdtune.",
        "",
        f"- **Trigger**: `{cfg.caption.trigger}` (class: {cfg.caption.class_noun})",
        f"- **Example prompt**: `{prompt}`",
        f"- **Final training loss**: {result.final_loss:.4f} after {result.steps} steps ({result.seconds:.0f} s)",
        "",
        "## Files",
        "",
    ]
    pipeline = pipeline_class(cfg.model.arch)
    for name in result.files:
        how = HOW_TO_LOAD.get(name, "")
        if name == EMBEDDINGS and not hasattr(pipeline, "load_textual_inversion"):
            how = EMBEDDINGS_WITHOUT_LOADER
        how = how.format(dir=".", file=name, pipeline=pipeline.__name__)
        lines.append(f"- `{name}`" + (f": {how}" if how else ""))
    lines += ["", "## Hyperparameters", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in hyper.items()]
    if metrics:
        lines += ["", "## Evaluation", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.5g} |" for k, v in sorted(metrics.items()) if isinstance(v, int | float)]
    return "\n".join(lines) + "\n"
