"""Validation during training: every ``train.validation_every`` steps, sample ``evaluate.prompts`` at the fixed
``evaluate.seeds`` with the weights being trained and keep a step-tagged grid.

The grid is written to ``<out>/validation/step_NNNNNN.png`` (always) and handed to the tracking logger's
``log_artifact`` when it has one (MLflow: under ``validation/``). The pipeline is built once, at the first
validation, around the live modules (no copy of the trained weights); the VAE and frozen text encoders are
loaded from the base model then. Sampling uses its own CPU generators, so the training random streams — and
with them exact resume — are untouched. Only rank 0 samples (a DDP replica's unwrapped module runs alone);
under FSDP every rank runs the forward passes (they are collectives) and rank 0 saves.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdtune.config import RunConfig

FOLDER = "validation"


class Validator:
    def __init__(
        self, cfg: RunConfig, out_dir: Path, log, accelerator, all_ranks: bool = False, **pipe_kwargs
    ):
        self.cfg, self.out_dir, self.log, self.acc = cfg, Path(out_dir), log, accelerator
        self.all_ranks = all_ranks
        self.pipe_kwargs = pipe_kwargs  # extra pipeline call arguments (inpainting: image, mask_image)
        self.pipe = None
        self.files: list[Path] = []

    def due(self, step: int) -> bool:
        every = self.cfg.train.validation_every
        return bool(every) and step % every == 0

    @torch.no_grad()
    def __call__(self, step: int, **modules: Any) -> Path | None:
        """Sample with ``modules`` (``unet=…``, optionally ``text_encoder=…``, ``tokenizer=…``) if due."""
        if not self.due(step) or not (self.all_ranks or self.acc.is_main_process):
            return None
        from sdtune.evaluate import make_grid
        from sdtune.models.loading import load_pipeline

        if self.pipe is None:
            self.pipe = load_pipeline(self.cfg, **modules).to(self.acc.device)
        for name, module in modules.items():
            setattr(self.pipe, name, module)
        trained = [m for m in modules.values() if isinstance(m, torch.nn.Module)]
        was_training = [m.training for m in trained]
        for m in trained:
            m.eval()
        cfg = self.cfg
        pairs = [(cfg.format_prompt(p), s) for p in cfg.evaluate.prompts for s in cfg.evaluate.seeds]
        res = cfg.preprocess.resolution
        try:
            # A denoiser compiled for the step (train.compile) samples eagerly: eval mode, no grad and
            # guidance's doubled batch would compile it a second time for a few dozen forwards (37 s for the
            # tiny UNet on a CPU; SD 1.5's first compile took 142 s on an H100; `graphs`: a second CUDA-graph
            # memory pool).
            with torch.compiler.set_stance("force_eager"), self.acc.autocast():
                images = self.pipe(
                    [p for p, _ in pairs],
                    num_inference_steps=cfg.train.validation_inference_steps,
                    guidance_scale=cfg.evaluate.guidance_scale,
                    generator=[torch.Generator("cpu").manual_seed(s) for _, s in pairs],
                    height=res,
                    width=res,
                    **self.pipe_kwargs,
                ).images
        finally:
            for m, mode in zip(trained, was_training, strict=True):
                m.train(mode)
        if not self.acc.is_main_process:
            return None
        path = self.out_dir / FOLDER / f"step_{step:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        make_grid({f"step {step}": images}, [f"{p} | seed {s}" for p, s in pairs]).save(path)
        self.files.append(path)
        log_artifact(self.log, path, FOLDER)
        return path

    def close(self) -> None:
        self.pipe = None


def log_artifact(log, path: Path, artifact_path: str) -> None:
    """``log.log_artifact`` where the logger (or one inside a CompositeLogger) has it; nothing otherwise."""
    if log is None:
        return
    for logger in getattr(log, "loggers", [log]):
        method = getattr(logger, "log_artifact", None)
        if callable(method):
            method(str(path), artifact_path)
