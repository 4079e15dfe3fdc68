"""Textual inversion: multi-vector tokens, only new rows change, both file formats load."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.config import RunConfig
from sdtune.train import embeddings as E
from tests.train.conftest import evaluate_run, write_config


@pytest.fixture(scope="module")
def ti_run(tmp_path_factory, tiny_sd15, stage_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("ti")
    config = write_config(
        root / "c.yaml",
        tiny_sd15,
        train={"method": "textual_inversion", "num_vectors": 2, "max_steps": 4, "learning_rate": 5e-2},
    )
    out = root / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    return config, out


def test_outputs_and_row_check(ti_run):
    _, out = ti_run
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"] == {
        "tokens": ["<sks>", "<sks>_1"],
        "other_embeddings_unchanged": True,
        "resumed_from_step": 0,
        "attempt": 0,
        "gradient_checkpointing": False,
        "gradient_checkpointing_reason": "auto: no GPU, nothing to save accelerator memory for",
        "mixed_precision": "no",
    }
    assert {"learned_embeds.safetensors", "sks.safetensors", "README.md", "metrics.jsonl"} <= {
        p.name for p in out.iterdir()
    }
    assert "pytorch_lora_weights.safetensors" not in {p.name for p in out.iterdir()}


def test_embeddings_load_in_both_formats(ti_run, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    _, out = ti_run
    vectors = load_file(out / "learned_embeds.safetensors")["<sks>"]
    assert vectors.shape == (2, 32)
    assert torch.equal(load_file(out / "sks.safetensors")["emb_params"], vectors)

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    before = pipe.text_encoder.get_input_embeddings().weight.detach().clone()
    init = before[pipe.tokenizer.convert_tokens_to_ids("robot</w>")]
    pipe.load_textual_inversion(str(out / "learned_embeds.safetensors"))
    ids = pipe.tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
    weight = pipe.text_encoder.get_input_embeddings().weight
    assert torch.equal(weight[ids], vectors)
    assert not torch.allclose(vectors[0], init)  # training moved them away from the initializer
    assert (
        pipe.maybe_convert_prompt("a photo of <sks> toy robot", pipe.tokenizer)
        == "a photo of <sks> <sks>_1 toy robot"
    )

    a1111 = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    a1111.load_textual_inversion(str(out / "sks.safetensors"), token="<sks>")
    assert torch.equal(a1111.text_encoder.get_input_embeddings().weight[ids], vectors)


def test_only_the_concept_rows_train(tiny_sd15):
    """The concept rows are their own parameter: AdamW (with weight decay) moves them and nothing else, and
    the encoder's output is exactly that of a plain table with the rows written in."""
    from transformers import CLIPTextModel, CLIPTokenizer

    tok = CLIPTokenizer.from_pretrained(tiny_sd15 / "tokenizer")
    enc = CLIPTextModel.from_pretrained(tiny_sd15 / "text_encoder")
    ids = E.add_concept_tokens(tok, enc, ["<x>", "<x>_1"], "robot")
    embedding = E.concept_embedding(enc, ids)
    table_before = E.table_digest(embedding.weight)
    rows_before = embedding.rows.detach().clone()
    assert [p for p in enc.parameters() if p.requires_grad] == [embedding.rows]
    opt = torch.optim.AdamW([embedding.rows], lr=1e-2, weight_decay=1e-2)
    input_ids = tok(
        ["a photo of <x> <x>_1", "<x> robot"], padding="max_length", return_tensors="pt"
    ).input_ids
    for _ in range(2):
        enc(input_ids)[0].pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
    assert E.table_digest(embedding.weight) == table_before
    assert not torch.equal(embedding.rows, rows_before)
    with torch.no_grad():
        trained = enc(input_ids)[0]
        enc.set_input_embeddings(embedding.merged())
        assert torch.equal(enc(input_ids)[0], trained)
        assert torch.equal(enc.get_input_embeddings().weight[ids], embedding.rows)


def test_caption_tokens():
    assert E.with_concept_tokens("a photo of sks toy robot", "sks", ["<sks>", "<sks>_1"]) == (
        "a photo of <sks> <sks>_1 toy robot"
    )
    assert E.with_concept_tokens("a toy robot", "sks", ["<sks>"]) == "<sks> a toy robot"
    assert E.with_concept_tokens("masks of sks", "sks", ["<sks>"]) == "masks of <sks>"
    cfg = RunConfig.model_validate(
        {"train": {"method": "textual_inversion", "num_vectors": 3}, "caption": {"trigger": "ohwx"}}
    )
    assert E.concept_tokens(cfg) == ["<ohwx>", "<ohwx>_1", "<ohwx>_2"]


def test_evaluate_uses_the_learned_token(ti_run, stage_dir, tmp_path):
    config, out = ti_run
    evaluate_run(config, stage_dir, out, tmp_path / "eval", "evaluate.seeds=[0]")
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["loss_delta_class"] == 0.0  # the class prompt does not use the new token
    assert metrics["loss_delta_trigger"] != 0.0


def test_sdxl_textual_inversion(tmp_path, tiny_sdxl, stage_dir):
    from diffusers import StableDiffusionXLPipeline

    config = write_config(
        tmp_path / "c.yaml",
        tiny_sdxl,
        model={"arch": "sdxl"},
        train={"method": "textual_inversion", "max_steps": 2},
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    state = load_file(out / "learned_embeds.safetensors")
    assert set(state) == {"clip_l", "clip_g"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    assert E.load_into_pipeline(pipe, out / "learned_embeds.safetensors") == "<sks>"
    tid = pipe.tokenizer_2.convert_tokens_to_ids("<sks>")
    assert torch.equal(pipe.text_encoder_2.get_input_embeddings().weight[tid], state["clip_g"][0])
