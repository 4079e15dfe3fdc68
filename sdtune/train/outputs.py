"""What a training run leaves in its output folder: weights, resolved config, summary, model card."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sdtune.config import RunConfig

LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
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

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["out_dir"] = str(self.out_dir)
        return data


def pipeline_class(arch: str):
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline if arch == "sdxl" else StableDiffusionPipeline


def save_unet_lora(unet, out_dir: Path, arch: str) -> Path:
    """Diffusers-format LoRA (with the adapter config as metadata, so alpha ≠ rank loads right)."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    pipeline_class(arch).save_lora_weights(
        out_dir,
        unet_lora_layers=layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        safe_serialization=True,
    )
    return out_dir / LORA_WEIGHTS


def write_run_files(cfg: RunConfig, out_dir: Path, result: TrainResult) -> None:
    (out_dir / CONFIG).write_text(cfg.to_yaml(), encoding="utf-8")
    (out_dir / SUMMARY).write_text(json.dumps(result.to_json(), indent=2) + "\n", encoding="utf-8")
