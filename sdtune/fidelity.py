"""Subject and prompt fidelity of generated samples, as in the DreamBooth paper's protocol.

- **CLIP-T**: cosine similarity of CLIP image and text embeddings between each sample and its prompt (with
  the trigger token removed, so the score measures the prompt, not the rare token).
- **CLIP-I** / **DINO**: mean pairwise cosine similarity between samples and the real instance images, with
  CLIP image embeddings and with a self-supervised ViT (DINO) CLS embedding. DINO is the better subject
  metric: unlike CLIP it tells two objects of the same class apart.
- **FID / KID** against held-out images, for large-dataset fine-tunes, when a feature model is configured and
  there are enough images; otherwise skipped with a note in the metrics.

Each score is computed for the base and the tuned samples (``clip_i_base``, ``clip_i_tuned``, …), so the
table shows what fine-tuning changed. Encoders load from a local folder, a hub id (on a cluster) or
``s3://`` like the base model (``evaluate.clip_model``, ``evaluate.dino_model``, ``evaluate.fid_model``);
when one is not set, its metrics are skipped with a note — never a failure.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from sdtune.config import RunConfig
from sdtune.manifest import read_manifest

Metrics = dict[str, Any]


def _sample_files(evaluation_dir: Path, row: str) -> list[tuple[int, Path]]:
    """(prompt index, file) for ``samples/<row>/p{i}_s{seed}.png``."""
    found = []
    for path in sorted((evaluation_dir / "samples" / row).glob("p*_s*.png")):
        match = re.match(r"p(\d+)_s\d+\.png$", path.name)
        if match:
            found.append((int(match.group(1)), path))
    return found


def _plain_prompt(cfg: RunConfig, template: str) -> str:
    text = template.format(trigger="", class_noun=cfg.caption.class_noun)
    return re.sub(r"\s+", " ", text).strip()


def _resolve(cfg: RunConfig, ref: str) -> str:
    """An encoder reference: ``s3://`` is downloaded once into the model cache; a folder or hub id as is."""
    if ref.startswith("s3://"):
        from sdtune.models.loading import download_s3

        return str(download_s3(ref, Path(cfg.model.cache_dir)))
    return str(Path(ref).expanduser().resolve()) if Path(ref).expanduser().is_dir() else ref


def _normalise(x):
    # transformers 5 returns an output object whose pooler_output holds the projected features
    x = getattr(x, "pooler_output", x)
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


class _ImageEmbedder(ABC):
    """A transformers vision model (eval mode) and its processor; images become unit-length embeddings."""

    def __init__(self, model, processor):
        self.model = model.eval()
        self.processor = processor

    @abstractmethod
    def _embed(self, pixels):
        """The model's embedding of a batch of processed images."""

    def images(self, images: list[Image.Image]):
        import torch

        with torch.no_grad():
            pixels = self.processor(images=images, return_tensors="pt")["pixel_values"]
            return _normalise(self._embed(pixels))


class ClipScorer(_ImageEmbedder):
    def __init__(self, source: str):
        from transformers import CLIPModel, CLIPProcessor

        super().__init__(CLIPModel.from_pretrained(source), CLIPProcessor.from_pretrained(source))

    def _embed(self, pixels):
        return self.model.get_image_features(pixel_values=pixels)

    def texts(self, texts: list[str]):
        import torch

        with torch.no_grad():
            tokens = self.processor(text=texts, return_tensors="pt", padding=True, truncation=True)
            return _normalise(
                self.model.get_text_features(
                    input_ids=tokens["input_ids"], attention_mask=tokens.get("attention_mask")
                )
            )


class DinoScorer(_ImageEmbedder):
    """CLS embedding of a ViT-style encoder (DINO/DINOv2 checkpoints, or any AutoModel with pooler/CLS)."""

    def __init__(self, source: str):
        from transformers import AutoImageProcessor, AutoModel

        super().__init__(AutoModel.from_pretrained(source), AutoImageProcessor.from_pretrained(source))

    def _embed(self, pixels):
        return self.model(pixel_values=pixels).last_hidden_state[:, 0]


def fidelity_metrics(cfg: RunConfig, evaluation_dir: Path, data_dir: Path) -> Metrics:
    """CLIP-T, CLIP-I, DINO (and FID/KID when configured) for the samples ``evaluate`` wrote."""
    evaluation_dir, data_dir = Path(evaluation_dir), Path(data_dir)
    ev = cfg.evaluate
    records = read_manifest(data_dir)
    instances = [Image.open(data_dir / r.file).convert("RGB") for r in records if r.split == "train"]
    rows = {row: _sample_files(evaluation_dir, row) for row in ("base", "tuned")}
    metrics: Metrics = {}
    notes = []

    if ev.clip_model:
        clip = ClipScorer(_resolve(cfg, ev.clip_model))
        instance_emb = clip.images(instances) if instances else None
        for row, samples in rows.items():
            if not samples:
                continue
            images = [Image.open(p).convert("RGB") for _, p in samples]
            emb = clip.images(images)
            texts = clip.texts([_plain_prompt(cfg, ev.prompts[i]) for i, _ in samples])
            metrics[f"clip_t_{row}"] = float((emb * texts).sum(-1).mean())
            if instance_emb is not None:
                metrics[f"clip_i_{row}"] = float((emb @ instance_emb.T).mean())
    else:
        notes.append("CLIP-T/CLIP-I skipped: evaluate.clip_model is not set")

    if ev.dino_model:
        dino = DinoScorer(_resolve(cfg, ev.dino_model))
        if instances:
            instance_emb = dino.images(instances)
            for row, samples in rows.items():
                if samples:
                    emb = dino.images([Image.open(p).convert("RGB") for _, p in samples])
                    metrics[f"dino_{row}"] = float((emb @ instance_emb.T).mean())
    else:
        notes.append("DINO skipped: evaluate.dino_model is not set")

    holdout = [Image.open(data_dir / r.file).convert("RGB") for r in records if r.split == "holdout"]
    tuned = [Image.open(p).convert("RGB") for _, p in rows["tuned"]]
    if not ev.fid_model:
        notes.append("FID/KID skipped: evaluate.fid_model is not set")
    elif min(len(holdout), len(tuned)) < ev.fid_min_images:
        notes.append(
            f"FID/KID skipped: need ≥ {ev.fid_min_images} held-out and generated images "
            f"(have {len(holdout)} and {len(tuned)})"
        )
    else:
        encoder = DinoScorer(_resolve(cfg, ev.fid_model))
        real = encoder.images(holdout).numpy().astype(np.float64)
        fake = encoder.images(tuned).numpy().astype(np.float64)
        metrics["fid"] = frechet_distance(real, fake)
        metrics["kid"] = kernel_inception_distance(real, fake)
    if notes:
        metrics["fidelity_note"] = "; ".join(notes)
    return metrics


def frechet_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """FID between two feature sets: ‖μr − μf‖² + Tr(Σr + Σf − 2(ΣrΣf)^½)."""
    from scipy import linalg

    mu_r, mu_f = real.mean(0), fake.mean(0)
    cov_r, cov_f = np.cov(real, rowvar=False), np.cov(fake, rowvar=False)
    covmean, _ = linalg.sqrtm(cov_r @ cov_f, disp=False)
    covmean = covmean.real
    return float(((mu_r - mu_f) ** 2).sum() + np.trace(cov_r + cov_f - 2 * covmean))


def kernel_inception_distance(real: np.ndarray, fake: np.ndarray) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³ (Bińkowski et al.)."""
    d = real.shape[1]
    k_rr = (real @ real.T / d + 1) ** 3
    k_ff = (fake @ fake.T / d + 1) ** 3
    k_rf = (real @ fake.T / d + 1) ** 3
    m, n = len(real), len(fake)
    term_rr = (k_rr.sum() - np.trace(k_rr)) / (m * (m - 1))
    term_ff = (k_ff.sum() - np.trace(k_ff)) / (n * (n - 1))
    return float(term_rr + term_ff - 2 * k_rf.mean())
