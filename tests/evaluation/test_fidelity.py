"""Fidelity metrics with tiny randomly initialised CLIP and ViT encoders built from configs (offline)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from sdtune.config import RunConfig
from sdtune.fidelity import fidelity_metrics, frechet_distance, kernel_inception_distance
from sdtune.manifest import Record, StageReport, write_stage


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    import torch
    from transformers import (
        CLIPConfig,
        CLIPImageProcessor,
        CLIPModel,
        CLIPProcessor,
        CLIPTokenizer,
        ViTConfig,
        ViTImageProcessor,
        ViTModel,
    )

    from sdtune.models.tiny import build_tiny

    root = tmp_path_factory.mktemp("encoders")
    tiny = build_tiny("sd15", root / "sd")
    tokenizer = CLIPTokenizer.from_pretrained(tiny / "tokenizer")
    torch.manual_seed(0)
    clip = CLIPModel(
        CLIPConfig(
            text_config={
                "vocab_size": len(tokenizer),
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
                "max_position_embeddings": 77,
            },
            vision_config={
                "image_size": 32,
                "patch_size": 8,
                "hidden_size": 32,
                "intermediate_size": 37,
                "num_hidden_layers": 1,
                "num_attention_heads": 2,
            },
            projection_dim=16,
        )
    )
    clip.save_pretrained(root / "clip")
    CLIPProcessor(
        image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
        tokenizer=tokenizer,
    ).save_pretrained(root / "clip")
    ViTModel(
        ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=37,
        )
    ).save_pretrained(root / "vit")
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root / "vit")
    return root


def _evaluation_dir(tmp_path):
    data, ev = tmp_path / "data", tmp_path / "ev"
    data.mkdir()
    records = []
    for i, colour in enumerate(["red", "orange", "teal", "navy", "olive"]):
        Image.new("RGB", (32, 32), colour).save(data / f"{i}.png")
        records.append(
            Record(
                file=f"{i}.png",
                width=32,
                height=32,
                sha256=str(i),
                source=str(i),
                split="holdout" if i == 4 else "train",
            )
        )
    write_stage(data, records, StageReport(stage="caption"))
    for row, colour in (("base", "gray"), ("tuned", "red")):
        (ev / "samples" / row).mkdir(parents=True)
        for p in range(2):
            for seed in range(2):
                Image.new("RGB", (32, 32), colour).save(ev / "samples" / row / f"p{p}_s{seed}.png")
    return data, ev


def test_clip_and_dino_scores_for_both_rows(encoders, tmp_path):
    data, ev = _evaluation_dir(tmp_path)
    cfg = RunConfig()
    cfg.evaluate.prompts = ["a photo of {trigger} {class_noun}", "a painting of {trigger} {class_noun}"]
    cfg.evaluate.clip_model = str(encoders / "clip")
    cfg.evaluate.dino_model = str(encoders / "vit")
    metrics = fidelity_metrics(cfg, ev, data)
    for key in ("clip_t_base", "clip_t_tuned", "clip_i_base", "clip_i_tuned", "dino_base", "dino_tuned"):
        assert -1.0 <= metrics[key] <= 1.0, key
    assert metrics["clip_i_base"] != metrics["clip_i_tuned"]  # different samples, different similarity
    assert "FID/KID skipped" in metrics["fidelity_note"]


def test_missing_encoders_are_skipped_with_a_note(tmp_path):
    data, ev = _evaluation_dir(tmp_path)
    metrics = fidelity_metrics(RunConfig(), ev, data)
    assert set(metrics) == {"fidelity_note"}
    assert "clip_model is not set" in metrics["fidelity_note"]


def test_fid_and_kid_behave():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(200, 8)), rng.normal(size=(200, 8))
    shifted = rng.normal(loc=2.0, size=(200, 8))
    assert frechet_distance(a, b) < 1.0 < frechet_distance(a, shifted)
    assert abs(kernel_inception_distance(a, b)) < 0.05 < kernel_inception_distance(a, shifted)
