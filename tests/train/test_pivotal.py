"""Pivotal tuning: embeddings + UNet LoRA from one run, loaded together."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from sdtune.cli import main
from tests.train.conftest import evaluate_run, load_quiet, sample, write_config


def test_pivotal_trains_both_and_they_load_together(tmp_path, tiny_sd15, stage_dir):
    from diffusers import StableDiffusionPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "method": "pivotal",
            "num_vectors": 2,
            "max_steps": 4,
            "embedding_train_fraction": 0.5,
            "embedding_learning_rate": 5e-2,
            "learning_rate": 3e-2,
            "log_every": 1,
        },
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["method"] == "pivotal" and summary["extra"]["embedding_steps"] == 2
    assert summary["extra"]["other_embeddings_unchanged"] is True
    assert {
        "learned_embeds.safetensors",
        "sks.safetensors",
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "README.md",
    } <= set(summary["files"]) | {"README.md"}
    norms = [json.loads(line)["embedding_norm"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert norms[1] != norms[0] and norms[3] == norms[2] == norms[1]  # embeddings frozen after step 2

    pipe = load_quiet(StableDiffusionPipeline, tiny_sd15)

    def generate():
        return sample(pipe, "a photo of <sks> toy robot")

    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    assert torch.equal(
        pipe.text_encoder.get_input_embeddings().weight[ids],
        load_file(out / "learned_embeds.safetensors")["<sks>"],
    )
    embeds_only = generate()
    pipe.load_lora_weights(out)
    assert (generate() - embeds_only).abs().max() > 1e-3

    eval_dir = tmp_path / "eval"
    evaluate_run(config, stage_dir, out, eval_dir, "evaluate.seeds=[0]")
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    assert metrics["loss_delta_class"] != 0.0  # the LoRA touches every prompt
