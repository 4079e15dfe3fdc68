"""Pivotal tuning on SDXL: both text encoders get the concept's rows and train them, and the outputs load
with diffusers' own loaders — the embeddings (A1111/ComfyUI SDXL layout: ``clip_l`` + ``clip_g``) into both
encoders with ``load_textual_inversion``, the LoRA with ``load_lora_weights`` from both of its files."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from sdtune.cli import main
from tests.train.conftest import load_quiet, sample, write_config


def test_sdxl_pivotal_trains_both_encoders_and_every_file_loads(tmp_path, tiny_sdxl, stage_dir):
    from diffusers import StableDiffusionXLPipeline

    train = {"method": "pivotal", "num_vectors": 2, "max_steps": 4, "embedding_train_fraction": 0.5}
    config = write_config(tmp_path / "c.yaml", tiny_sdxl, model={"arch": "sdxl"}, train=train)
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"]["embedding_steps"] == 2 and summary["extra"]["other_embeddings_unchanged"]
    assert {"learned_embeds.safetensors", "sks.safetensors", "pytorch_lora_weights.safetensors"} <= set(
        summary["files"]
    ) and "lora_kohya.safetensors" in summary["files"]

    pipe = load_quiet(StableDiffusionXLPipeline, tiny_sdxl)
    encoders = {
        "clip_l": (pipe.tokenizer, pipe.text_encoder),
        "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2),
    }
    state, a1111 = load_file(out / "learned_embeds.safetensors"), load_file(out / "sks.safetensors")
    assert set(state) == set(a1111) == set(encoders)  # the A1111/ComfyUI SDXL embedding layout
    for name, (tokenizer, encoder) in encoders.items():
        assert torch.equal(state[name], a1111[name])
        width = encoder.get_input_embeddings().weight.shape[1]
        assert state[name].shape == (2, width)
        start = (
            encoder.get_input_embeddings().weight[tokenizer.encode("robot", add_special_tokens=False)].mean(0)
        )
        assert not torch.allclose(state[name], start.expand(2, -1)), f"{name}: the new rows did not train"

    def generate():
        return sample(pipe, "a photo of <sks> toy robot")

    base = generate()
    for name, (tokenizer, encoder) in encoders.items():  # diffusers' documented SDXL way, file as saved
        pipe.load_textual_inversion(a1111[name], token="<sks>", text_encoder=encoder, tokenizer=tokenizer)
        ids = tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
        assert torch.equal(encoder.get_input_embeddings().weight[ids], state[name])
    embeds_only = generate()
    assert (embeds_only - base).abs().max() > 1e-4  # both encoders read the new token

    pipe.load_lora_weights(out, adapter_name="diffusers")
    with_lora = generate()
    assert (with_lora - embeds_only).abs().max() > 1e-3
    pipe.delete_adapters("diffusers")
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors", adapter_name="kohya")
    assert (generate() - with_lora).abs().max() < 5e-3  # kohya's file (fp16) gives the same image
