"""SD3 beyond the transformer LoRA, on the tiny SD3 model: text-encoder LoRA, textual inversion and pivotal
tuning (new rows in both CLIP encoders; T5 stays frozen), each loaded back with diffusers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.config import load_config
from tests.train.conftest import load_quiet, sample, write_config

CONCEPT = "a photo of <sks> <sks>_1 toy robot"  # SD3's pipeline does not expand <sks>: all tokens written


def _train(tmp_path, base, stage_dir, model: dict | None = None, **train):
    model = {"arch": "sd3", **(model or {})}
    config = write_config(
        tmp_path / "c.yaml", base, model=model, train=train, evaluate={"guidance_scale": 1.0}
    )
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    return config, out, json.loads((out / "train_summary.json").read_text())


def _pipe(base):
    from diffusers import StableDiffusion3Pipeline

    return load_quiet(StableDiffusion3Pipeline, base)


def _grid(pipe, cfg, step: int) -> np.ndarray:
    """The validation grid of ``step`` (:mod:`sdtune.train.validation`) drawn again with ``pipe``."""
    from sdtune.evaluate import make_grid

    pairs = [(cfg.format_prompt(p), s) for p in cfg.evaluate.prompts for s in cfg.evaluate.seeds]
    images = pipe(
        [p for p, _ in pairs],
        num_inference_steps=cfg.train.validation_inference_steps,
        guidance_scale=cfg.evaluate.guidance_scale,
        generator=[torch.Generator("cpu").manual_seed(s) for _, s in pairs],
        height=cfg.preprocess.resolution,
        width=cfg.preprocess.resolution,
    ).images
    grid = make_grid({f"step {step}": images}, [f"{p} | seed {s}" for p, s in pairs])
    return np.asarray(grid, dtype=np.int16)


def _validation_grid(out, step: int) -> np.ndarray:
    return np.asarray(Image.open(out / "validation" / f"step_{step:06d}.png").convert("RGB"), dtype=np.int16)


def test_sd3_text_conditioning_is_the_pipelines(tiny_sd3, tmp_path):
    """What the recipes feed the transformer (CLIP states per step, T5 once) is what the pipeline feeds it."""
    from sdtune.models.loading import load_components
    from sdtune.train import data as D

    cfg = load_config(write_config(tmp_path / "c.yaml", tiny_sd3, model={"arch": "sd3"}))
    prompts = ["a photo of sks toy robot", "a red square"]
    ours = D.encode_prompts(load_components(cfg), prompts, "cpu", 64, max_sequence_length=77)
    with torch.no_grad():
        embeds, _, pooled, _ = _pipe(tiny_sd3).encode_prompt(
            prompts, None, None, do_classifier_free_guidance=False, max_sequence_length=77
        )
    assert torch.allclose(ours["prompt_embeds"], embeds) and torch.allclose(ours["pooled_embeds"], pooled)


def test_sd3_text_encoder_lora_loads_to_the_in_memory_image(tmp_path, tiny_sd3, stage_dir):
    train = {"train_text_encoder": True, "text_encoder_lr": 1e-2, "validation_every": 4}
    cfg_path, out, summary = _train(tmp_path, tiny_sd3, stage_dir, validation_inference_steps=2, **train)
    assert summary["extra"]["text_encoder_lora"] == ["text_encoder", "text_encoder_2"]
    assert summary["files"] == ["pytorch_lora_weights.safetensors"]  # no kohya file for SD3
    prefixes = {k.split(".")[0] for k in load_file(out / "pytorch_lora_weights.safetensors")}
    assert prefixes == {"transformer", "text_encoder", "text_encoder_2"}  # T5 frozen

    # The step-4 validation grid was sampled by the pipeline around the live, in-memory tuned modules; the
    # base pipeline with the saved file loaded through diffusers draws the same grid.
    cfg = load_config(cfg_path)
    pipe = _pipe(tiny_sd3)
    in_memory = _validation_grid(out, 4)

    def grid():
        return _grid(pipe, cfg, 4)

    base = grid()
    pipe.load_lora_weights(out, adapter_name="diffusers")
    loaded = grid()
    assert np.abs(loaded - in_memory).max() <= 1 < np.abs(base - in_memory).max()
    for name in ("text_encoder", "text_encoder_2"):
        assert "diffusers" in getattr(pipe, name).peft_config
    # Without its text-encoder part the file would not give the in-memory grid: that part carries weight.
    state = load_file(out / "pytorch_lora_weights.safetensors")
    pipe = _pipe(tiny_sd3)
    pipe.load_lora_weights({k: v for k, v in state.items() if k.startswith("transformer.")})
    assert np.abs(grid() - in_memory).max() > 1


@pytest.mark.parametrize("method", ["textual_inversion", "pivotal"])
def test_sd3_concept_methods_train_only_new_rows_and_load(tmp_path, tiny_sd3, stage_dir, method):
    train = {"method": method, "num_vectors": 2, "max_steps": 2}
    if method == "pivotal":
        train["embedding_train_fraction"] = 1.0
    _, out, summary = _train(tmp_path, tiny_sd3, stage_dir, **train)
    assert summary["extra"]["tokens"] == ["<sks>", "<sks>_1"]
    assert summary["extra"]["other_embeddings_unchanged"]  # every old row of both tables, bit for bit
    files = {"learned_embeds.safetensors", "sks.safetensors"}
    if method == "pivotal":
        files.add("pytorch_lora_weights.safetensors")
    assert set(summary["files"]) == files
    assert "load_into_pipeline" in (out / "README.md").read_text()  # SD3's pipeline has no TI loader

    pipe = _pipe(tiny_sd3)
    encoders = {
        "clip_l": (pipe.tokenizer, pipe.text_encoder),
        "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2),
    }
    old = {name: enc.get_input_embeddings().weight.detach().clone() for name, (_, enc) in encoders.items()}
    state, a1111 = load_file(out / "learned_embeds.safetensors"), load_file(out / "sks.safetensors")
    assert set(state) == set(encoders)  # T5 gets no rows
    base = sample(pipe, CONCEPT, guidance_scale=1.0)

    from sdtune.train.embeddings import load_into_pipeline

    assert load_into_pipeline(pipe, out / "learned_embeds.safetensors") == "<sks> <sks>_1"
    for name, (tokenizer, encoder) in encoders.items():
        assert torch.equal(state[name], a1111[name])
        weight = encoder.get_input_embeddings().weight
        ids = tokenizer.convert_tokens_to_ids(["<sks>", "<sks>_1"])
        assert torch.equal(weight[ids], state[name]) and torch.equal(weight[: len(old[name])], old[name])
        start = old[name][tokenizer.encode("robot", add_special_tokens=False)].mean(0)
        assert not torch.allclose(state[name], start.expand(2, -1)), f"{name}: the new rows did not train"
    embedded = sample(pipe, CONCEPT, guidance_scale=1.0)
    assert (embedded - base).abs().max() > 1e-4
    if method == "pivotal":
        assert {k.split(".")[0] for k in load_file(out / "pytorch_lora_weights.safetensors")} == {
            "transformer"
        }
        pipe.load_lora_weights(out)
        assert (sample(pipe, CONCEPT, guidance_scale=1.0) - embedded).abs().max() > 1e-3


def test_sd3_dreambooth_with_prior_saves_the_in_memory_pipeline(tmp_path, tiny_sd3, stage_dir):
    from diffusers import StableDiffusion3Pipeline

    train = {"num_class_images": 2, "class_image_steps": 2, "validation_every": 2, "max_steps": 2}
    model = {"cache_dir": str(tmp_path / "cache")}  # class images generated with SD3's pipeline, cached here
    cfg_path, out, summary = _train(tmp_path, tiny_sd3, stage_dir, model, method="dreambooth", **train)
    assert summary["extra"]["class_images"] == 2 and "model.safetensors" not in summary["files"]
    assert 'StableDiffusion3Pipeline.from_pretrained(".")' in (out / "README.md").read_text()
    cfg = load_config(cfg_path)
    base = _grid(_pipe(tiny_sd3), cfg, 2)
    tuned = _grid(load_quiet(StableDiffusion3Pipeline, out), cfg, 2)  # the whole pipeline, as saved
    in_memory = _validation_grid(out, 2)
    assert np.abs(tuned - in_memory).max() <= 1 < np.abs(base - in_memory).max()


def test_sd3_full_with_ema_and_disk_shards_saves_the_in_memory_pipeline(tmp_path, tiny_sd3, stage_dir):
    """EMA at a decay of ~0 holds the live weights: the saved (EMA) transformer draws the in-memory grid."""
    from diffusers import StableDiffusion3Pipeline

    train = {"use_ema": True, "ema_decay": 1e-6, "cache_shard_size": 2, "validation_every": 2, "max_steps": 2}
    cfg_path, out, summary = _train(tmp_path, tiny_sd3, stage_dir, method="full", learning_rate=1e-3, **train)
    assert summary["files"] == ["model_index.json"]  # no original-layout single file for SD3
    assert summary["extra"]["ema"] and summary["extra"]["cache_shards"] == 2
    cfg = load_config(cfg_path)
    base = _grid(_pipe(tiny_sd3), cfg, 2)
    tuned = _grid(load_quiet(StableDiffusion3Pipeline, out), cfg, 2)
    in_memory = _validation_grid(out, 2)
    assert np.abs(tuned - in_memory).max() <= 1 < np.abs(base - in_memory).max()
