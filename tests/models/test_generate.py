"""`sdtune generate` on the tiny model: base, a training output and a registered alias, parameters in the PNGs."""

from __future__ import annotations

import json

import numpy as np
from PIL import Image

from sdtune.cli import main
from sdtune.config import load_config
from tests.train.conftest import write_config


def _pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def test_generate_base_lora_and_registered_alias(tmp_path, tiny_sd15, stage_dir, sdtune_home, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_sd15, train={"max_steps": 3, "learning_rate": 0.3})
    lora = tmp_path / "lora"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(lora)]) == 0
    common = ["--config", str(config), "-p", "a photo of sks toy robot", "-p", "a dog", "--seeds", "0,3"]
    common += ["--steps", "2", "--guidance", "5.5", "-n", "blurry"]

    assert main(["generate", *common, "--out", str(tmp_path / "base")]) == 0
    assert main(["generate", *common, "--lora", str(lora), "--out", str(tmp_path / "tuned")]) == 0

    names = sorted(p.name for p in (tmp_path / "tuned").iterdir())
    assert names == ["00-seed0.png", "00-seed3.png", "01-seed0.png", "01-seed3.png", "grid.png"]
    image = Image.open(tmp_path / "tuned" / "00-seed3.png")
    params = json.loads(image.text["sdtune"])
    assert params["prompt"] == "a photo of sks toy robot" and params["seed"] == 3 and params["steps"] == 2
    assert params["guidance"] == 5.5 and params["negative_prompt"] == "blurry" and params["size"] == 64
    assert params["model"] == str(lora)
    a1111 = image.text["parameters"].splitlines()
    assert a1111[0] == "a photo of sks toy robot" and a1111[1] == "Negative prompt: blurry"
    assert "Steps: 2" in a1111[2] and "CFG scale: 5.5" in a1111[2] and "Seed: 3" in a1111[2]
    grid = Image.open(tmp_path / "tuned" / "grid.png")
    assert grid.width > 2 * 64 and grid.height > 2 * 64  # two prompts across, two seeds down
    # The LoRA is applied: same prompt and seed, other pixels than the base model's.
    base, tuned = _pixels(tmp_path / "base" / "00-seed0.png"), _pixels(tmp_path / "tuned" / "00-seed0.png")
    assert np.abs(base - tuned).max() > 0
    # Same seed, same image: seeds are per image, not per batch.
    again = tmp_path / "again"
    assert main(["generate", *common, "--lora", str(lora), "--out", str(again)]) == 0
    assert np.array_equal(_pixels(again / "01-seed3.png"), _pixels(tmp_path / "tuned" / "01-seed3.png"))

    from sdtune.registry import register_model

    cfg = load_config(config, ["register.model_name=gen-test"])
    register_model(cfg, lora, {"loss_tuned_trigger": 0.5}, run_id=None)
    registered = tmp_path / "registered"
    args = [
        "generate",
        "--lora",
        "models:/gen-test@champion",
        "-p",
        "a photo of sks toy robot",
        "-p",
        "a dog",
    ]
    args += ["--seeds", "0,3", "--steps", "2", "--guidance", "5.5", "-n", "blurry", "--out", str(registered)]
    assert main(args) == 0  # no --config: the registered version's own config
    assert np.array_equal(_pixels(registered / "00-seed0.png"), tuned)
    assert (
        json.loads(Image.open(registered / "00-seed0.png").text["sdtune"])["model"]
        == "models:/gen-test@champion"
    )

    assert (
        main(
            ["generate", "--lora", "models:/no-such-model@champion", "-p", "x", "--out", str(tmp_path / "x")]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
