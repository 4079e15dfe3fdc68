"""The LoRA recipe end to end on the tiny model, through the real CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from sdtune.cli import main
from tests.train.conftest import evaluate_run, make_stage, sample, write_config


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd15, stage_dir) -> tuple[Path, Path]:
    """One 4-step LoRA run shared by the tests below: (config, out_dir)."""
    root = tmp_path_factory.mktemp("lora")
    config = write_config(root / "config.yaml", tiny_sd15)
    out = root / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    return config, out


def test_train_writes_outputs(trained):
    _, out = trained
    assert {p.name for p in out.iterdir()} >= {
        "pytorch_lora_weights.safetensors",
        "lora_kohya.safetensors",
        "metrics.jsonl",
        "config.yaml",
        "train_summary.json",
        "README.md",
    }
    card = (out / "README.md").read_text()
    assert "base_model:" in card and "`sks`" in card and "LoRA rank | 4" in card
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in lines] == [2, 4]  # log_every=2
    assert all(math.isfinite(row["loss"]) for row in lines)
    assert {"loss", "lr", "grad_norm", "steps_per_sec"} <= set(lines[0])
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and summary["method"] == "lora" and math.isfinite(summary["final_loss"])
    assert "max_steps: 4" in (out / "config.yaml").read_text()

    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        keys = list(fh.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    assert any(k.endswith("attn1.to_q.lora.down.weight") for k in keys)
    assert any(k.endswith("attn2.to_out.0.lora.up.weight") for k in keys)


def test_lora_loads_and_changes_the_image(trained, tiny_sd15):
    from diffusers import StableDiffusionPipeline

    _, out = trained
    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd15, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return sample(pipe)

    before = generate()
    pipe.load_lora_weights(out, adapter_name="diffusers")
    after = generate()
    assert (after - before).abs().max() > 1e-3

    # The kohya file goes through diffusers' own kohya conversion (which raises on any key it cannot map)
    # and gives the same image.
    pipe.delete_adapters("diffusers")
    assert torch.allclose(generate(), before)
    state, alphas = pipe.lora_state_dict(out, weight_name="lora_kohya.safetensors")
    assert alphas and all(k.startswith("unet.") for k in state)
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors", adapter_name="kohya")
    kohya = generate()
    assert (kohya - after).abs().max() < 0.05 * (after - before).abs().max()  # fp16 storage in the kohya file


def test_overrides_and_alpha(tmp_path, tiny_sd15, stage_dir):
    """key=value overrides reach the recipe; alpha ≠ rank survives the save (adapter metadata)."""
    config = write_config(tmp_path / "c.yaml", tiny_sd15)
    out = tmp_path / "out"
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]
    assert (
        main(
            [
                *args,
                "train.max_steps=2",
                "train.rank=2",
                "train.alpha=8",
                "train.lr_scheduler=cosine",
                "train.lr_warmup_steps=1",
                "train.gradient_accumulation_steps=2",
                "train.snr_gamma=5",
                "train.noise_offset=0.05",
                "train.prediction_type=v_prediction",
            ]
        )
        == 0
    )
    assert json.loads((out / "train_summary.json").read_text())["steps"] == 2
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
        shape = fh.get_slice(next(k for k in fh.keys() if k.endswith("lora.down.weight"))).get_shape()  # noqa: SIM118
    assert meta["unet.r"] == 2 and meta["unet.lora_alpha"] == 8 and shape[0] == 2


@pytest.mark.parametrize(
    "extra, message",
    [
        (["train.max_steps=0"], "train.max_steps"),
        (["train.no_such_key=1"], "no_such_key"),
        (["notkeyvalue"], "not key=value"),
    ],
)
def test_config_errors_exit_2(tmp_path, tiny_config, stage_dir, capsys, extra, message):
    args = [
        "train",
        "--config",
        str(tiny_config),
        "--data",
        str(stage_dir),
        "--out",
        str(tmp_path / "o"),
        *extra,
    ]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_config_file_exit_2(tmp_path, stage_dir, capsys):
    code = main(
        ["train", "--config", str(tmp_path / "nope.yaml"), "--data", str(stage_dir), "--out", str(tmp_path)]
    )
    assert code == 2
    assert "config file not found" in capsys.readouterr().err


def test_missing_base_model_exit_2(tmp_path, stage_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tmp_path / "missing-model")
    assert (
        main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(tmp_path / "o")]) == 2
    )
    assert "base model folder not found" in capsys.readouterr().err


def test_non_finite_loss_names_the_step(tmp_path, tiny_config, stage_dir, monkeypatch, capsys):
    import sdtune.train.losses as losses

    real = losses.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(losses, "diffusion_loss", poisoned)
    out = tmp_path / "o"
    code = main(["train", "--config", str(tiny_config), "--data", str(stage_dir), "--out", str(out)])
    assert code == 3
    assert "not finite at step 3" in capsys.readouterr().err
    assert not (out / "pytorch_lora_weights.safetensors").exists()


def test_no_train_records_is_a_dataset_error(tmp_path, tiny_config, capsys):
    stage = make_stage(tmp_path / "allholdout", n=2, holdout=2)
    assert (
        main(["train", "--config", str(tiny_config), "--data", str(stage), "--out", str(tmp_path / "o")]) == 2
    )
    assert "no records with split 'train'" in capsys.readouterr().err


def test_evaluate_writes_metrics_and_grid(trained, stage_dir, tmp_path, capsys):
    config, out = trained
    eval_dir = tmp_path / "eval"
    evaluate_run(config, stage_dir, out, eval_dir)
    metrics = json.loads((eval_dir / "metrics.json").read_text())
    for key in (
        "loss_base_trigger",
        "loss_tuned_trigger",
        "loss_base_class",
        "loss_tuned_class",
        "loss_delta_trigger",
        "loss_delta_class",
    ):
        assert math.isfinite(metrics[key]), key
    assert metrics["loss_split"] == "holdout" and metrics["loss_records"] == 1.0
    assert metrics["loss_delta_trigger"] == pytest.approx(
        metrics["loss_tuned_trigger"] - metrics["loss_base_trigger"]
    )
    from PIL import Image

    with Image.open(eval_dir / "grid.png") as grid:
        assert grid.width > 4 * 64 and grid.height > 2 * 64  # 2 prompts x 2 seeds, rows base + tuned
    assert len(list((eval_dir / "samples" / "base").glob("*.png"))) == 4
    assert len(list((eval_dir / "samples" / "tuned").glob("*.png"))) == 4


def test_evaluate_without_holdout_says_so(trained, tmp_path):
    from sdtune.config import load_config
    from sdtune.evaluate import evaluate

    config, out = trained
    stage = make_stage(tmp_path / "noholdout", n=2, holdout=0)
    cfg = load_config(
        config, ["evaluate.prompts=['a photo of {trigger} {class_noun}']", "evaluate.seeds=[0]"]
    )
    metrics = evaluate(cfg, cfg.model.base, out, stage, tmp_path / "eval")
    assert metrics["loss_on_train_records"] == 1.0
    written = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert written["loss_split"] == "train" and "no holdout" in written["note"]


def test_kohya_keys_and_alpha(trained):
    _, out = trained
    with safe_open(out / "lora_kohya.safetensors", "pt") as fh:
        keys = list(fh.keys())  # noqa: SIM118
        alpha = fh.get_tensor(next(k for k in keys if k.endswith(".alpha")))
    assert all(k.startswith("lora_unet_") for k in keys)
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight" in keys
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q.alpha" in keys
    assert float(alpha) == 4.0


def test_sdxl_lora_trains_and_loads(tmp_path, tiny_sdxl, stage_dir):
    from diffusers import StableDiffusionXLPipeline

    config = write_config(tmp_path / "c.yaml", tiny_sdxl, model={"arch": "sdxl"})
    out = tmp_path / "out"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(stage_dir),
                "--out",
                str(out),
                "train.max_steps=3",
            ]
        )
        == 0
    )
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return sample(pipe)

    before = generate()
    pipe.load_lora_weights(out)
    after = generate()
    assert (after - before).abs().max() > 1e-3
    pipe.unload_lora_weights()
    pipe.load_lora_weights(out, weight_name="lora_kohya.safetensors")
    assert (generate() - after).abs().max() < 0.05 * (after - before).abs().max()


def _files(folder: Path) -> dict[str, bytes]:
    return {
        p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_train_evaluate_generate_refuse_an_out_they_would_damage(trained, stage_dir, tmp_path, capsys):
    """A folder of someone's files, the data or model read, a folder around them, and a file are refused
    with one line (exit 2) before anything is written: `train --out proj` used to replace proj/README.md,
    `--out DATA` mixed weights into the dataset, `--out FILE` was a FileExistsError traceback."""
    config, lora = trained
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "README.md").write_text("mine")
    (tmp_path / "afile").write_text("mine")
    data, model = _files(stage_dir), _files(lora)
    commands = {
        "train": ["train", "--config", str(config), "--data", str(stage_dir)],
        "evaluate": ["evaluate", "--config", str(config), "--data", str(stage_dir), "--lora", str(lora)],
        "generate": ["generate", "--config", str(config), "--lora", str(lora), "-p", "x", "--steps", "1"],
    }
    cases = [
        (proj, "is not empty (holds 'README.md') and is not an earlier `sdtune {command}` output"),
        (tmp_path / "afile", "is not a folder"),
        (tmp_path / "afile" / "out", "is not a folder (" + str(tmp_path / "afile") + " is a file)"),
        (lora, "is the input folder"),
        (lora / "more", "lies inside the input"),
    ]
    data_cases = [
        (stage_dir, "is the input folder"),
        (stage_dir / "weights", "lies inside the input"),
        (stage_dir.parent, "holds the input"),
    ]
    capsys.readouterr()
    for command, args in commands.items():
        for out, message in cases + (data_cases if command != "generate" else []):
            if command == "train" and out.is_relative_to(lora):
                continue  # train does not read a training output
            assert main([*args, "--out", str(out)]) == 2, (command, out)
            err = capsys.readouterr().err
            assert err.startswith("error:") and len(err.strip().splitlines()) == 1, err
            assert message.format(command=command) in " ".join(err.split()), (command, out, err)
    assert (
        sorted(p.name for p in proj.iterdir()) == ["README.md"] and (proj / "README.md").read_text() == "mine"
    )
    assert (tmp_path / "afile").read_text() == "mine"
    assert _files(stage_dir) == data and _files(lora) == model


def test_evaluate_again_into_its_own_output(trained, stage_dir, tmp_path):
    """An earlier evaluation folder is an earlier output of the same command: replaced, not refused."""
    config, out = trained
    first = evaluate_run(config, stage_dir, out, tmp_path / "eval", "evaluate.seeds=[0]")
    again = evaluate_run(config, stage_dir, out, tmp_path / "eval", "evaluate.seeds=[0]")
    assert again.keys() == first.keys()
