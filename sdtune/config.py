"""Typed run configuration: one YAML file names a whole run (data → caption → train → evaluate → register).

Every section is a strict pydantic model: an unknown key or a bad value is a :class:`ConfigError` with one
line naming the key. Presets live in ``configs/<model>/<method>_<hardware>.yaml``; ``key=value``
overrides use dotted paths from the root (``train.learning_rate=5e-5``) and YAML values (``true``, ``[a,b]``).

This module imports pydantic and yaml only, so it is safe to import anywhere (components, pipelines, tests).
"""

from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from sdtune.errors import ConfigError

Arch = Literal["sd15", "sd2", "sdxl", "sd3"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(Section):
    """The base model: a local diffusers folder, a hub id (on a cluster) or ``s3://bucket/prefix``."""

    base: str = ".sdtune/models/tiny-sd15"
    arch: Arch = "sd15"
    revision: str | None = None
    cache_dir: str = ".sdtune/cache/models"


class IngestConfig(Section):
    sources: list[str] = Field(default_factory=list)
    min_images: int = Field(5, ge=1)
    max_reject_fraction: float = Field(0.5, ge=0.0, le=1.0)
    max_aspect_ratio: float = Field(4.0, ge=1.0)
    background: str = "white"  # what transparent pixels are composited onto


class PreprocessConfig(Section):
    resolution: int = Field(512, ge=8)
    crop: Literal["center", "none"] = "center"
    upscaler: Literal["lanczos"] = "lanczos"


class CaptionConfig(Section):
    trigger: str = "sks"
    class_noun: str = "person"
    template: str = "a photo of {trigger} {class_noun}"
    use_sidecars: bool = True
    holdout_fraction: float = Field(0.15, ge=0.0, lt=1.0)  # held out for evaluation (≥1 image if ≥5)


class TrainConfig(Section):
    method: Literal["lora"] = "lora"
    max_steps: int = Field(500, ge=1)
    batch_size: int = Field(1, ge=1)
    gradient_accumulation_steps: int = Field(1, ge=1)
    learning_rate: float = Field(1e-4, gt=0)
    lr_scheduler: Literal["constant", "cosine"] = "constant"
    lr_warmup_steps: int = Field(0, ge=0)
    adam_weight_decay: float = Field(1e-2, ge=0)
    max_grad_norm: float = Field(1.0, gt=0)
    rank: int = Field(4, ge=1)
    alpha: float | None = None  # defaults to rank (scale 1.0)
    target_modules: list[str] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"
    seed: int = 0
    log_every: int = Field(1, ge=1)
    num_processes: int = Field(1, ge=1)  # processes per node (GPUs); >1 launches through torchrun


class EvaluateConfig(Section):
    prompts: list[str] = Field(
        default_factory=lambda: [
            "a photo of {trigger} {class_noun}",
            "a photo of {trigger} {class_noun} on a beach",
            "a painting of {trigger} {class_noun}",
        ]
    )
    seeds: list[int] = Field(default_factory=lambda: [0, 1])
    num_inference_steps: int = Field(25, ge=1)
    guidance_scale: float = 7.5
    loss_timesteps: list[int] = Field(default_factory=lambda: [100, 300, 500, 700, 900])
    loss_seeds: list[int] = Field(default_factory=lambda: [0, 1, 2])


class RegisterConfig(Section):
    model_name: str = "sdtune-model"
    alias: str = "candidate"


class TrackingConfig(Section):
    experiment: str = "sdtune"


class RunConfig(Section):
    """A whole run. ``name`` names the MLflow run and, by default, the registered model."""

    name: str = "sdtune-run"
    model: ModelConfig = Field(default_factory=ModelConfig)
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    caption: CaptionConfig = Field(default_factory=CaptionConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    register: RegisterConfig = Field(default_factory=RegisterConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.train.batch_size * self.train.num_processes < 1:
            raise ValueError("batch size must be positive")
        return self

    def digest(self) -> str:
        """Stable hash of the resolved config (used for cache keys and resume checks)."""
        return hashlib.sha256(json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def format_prompt(self, template: str) -> str:
        return template.format(trigger=self.caption.trigger, class_noun=self.caption.class_noun)


def parse_overrides(overrides: list[str]) -> dict[str, Any]:
    """``["train.rank=8", "ingest.sources=[a,b]"]`` → nested dict, values parsed as YAML."""
    nested: dict[str, Any] = {}
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"override {item!r} is not key=value")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({exc.__class__.__name__})") from None
        node = nested
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r} conflicts with another override")
        node[parts[-1]] = value
    return nested


def _merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def config_from_dict(data: dict[str, Any], overrides: list[str] | None = None, origin: str = "config") -> RunConfig:
    data = _merge(data or {}, parse_overrides(overrides or []))
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(root)"
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{origin}: {where}: {first['msg']}{more}") from None


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Load a YAML preset (or the defaults when ``path`` is None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    origin = "defaults"
    if path is not None:
        path = Path(path)
        origin = str(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: top level must be a mapping")
    return config_from_dict(data, overrides, origin=origin)


def config_from_yaml(text: str) -> RunConfig:
    """Inverse of :meth:`RunConfig.to_yaml`; how pipeline tasks receive the config."""
    return config_from_dict(yaml.safe_load(text) or {}, origin="pipeline config")


def resolve_local_paths(cfg: RunConfig, root: Path) -> RunConfig:
    """Make relative local paths absolute against ``root`` (pipeline tasks may run in another cwd)."""
    cfg = cfg.model_copy(deep=True)

    def fix(value: str) -> str:
        if "://" in value or value.startswith("@") or Path(value).is_absolute():
            return value
        candidate = root / value
        # A bare hub id ("org/name") stays as it is unless such a folder exists locally.
        if value.startswith((".", "/")) or candidate.exists():
            return str(candidate.resolve())
        return value

    cfg.model.base = fix(cfg.model.base)
    cfg.model.cache_dir = str((root / cfg.model.cache_dir).resolve()) if not Path(cfg.model.cache_dir).is_absolute() else cfg.model.cache_dir
    cfg.ingest.sources = [fix(s) for s in cfg.ingest.sources]
    return cfg
