"""SD3: the tiny MMDiT model, the flow-matching LoRA recipe (train, resume, load) and evaluation."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from sdtune.cli import main
from tests.train.conftest import sample, write_config


def _config(path: Path, base: Path, **train) -> Path:
    return write_config(
        path,
        base,
        model={"arch": "sd3"},
        train={"checkpoint_every": 2, "validation_every": 4, "validation_inference_steps": 2, **train},
        evaluate={"guidance_scale": 1.0},
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_sd3, stage_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sd3")
    config = _config(root / "config.yaml", tiny_sd3)
    out = root / "out"
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]) == 0
    return config, out


def test_flow_matching_pieces():
    from diffusers import FlowMatchEulerDiscreteScheduler

    from sdtune.train import losses as L

    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    x0, noise = torch.randn(3, 16, 4, 4), torch.randn(3, 16, 4, 4)
    for density in ("logit_normal", "uniform"):
        t, sigmas = L.sample_flow_timesteps(3, scheduler, torch.Generator().manual_seed(0), "cpu", density)
        assert torch.allclose(t, sigmas * 1000) and ((sigmas > 0) & (sigmas <= 1)).all()
    s = torch.tensor([0.0, 0.5, 1.0])
    noisy = L.flow_noisy(x0, noise, s)
    assert torch.equal(noisy[0], x0[0]) and torch.equal(noisy[2], noise[2])
    assert torch.allclose(noisy[1], 0.5 * (x0[1] + noise[1]))
    assert torch.equal(L.flow_target(x0, noise), noise - x0)


def test_sd3_lora_trains_and_saves(trained):
    _, out = trained
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["steps"] == 4 and math.isfinite(summary["final_loss"])
    assert summary["extra"]["objective"] == "flow_matching" and summary["files"] == [
        "pytorch_lora_weights.safetensors"
    ]
    with safe_open(out / "pytorch_lora_weights.safetensors", "pt") as fh:
        keys = list(fh.keys())
        meta = json.loads(fh.metadata()["lora_adapter_metadata"])
    assert keys and all(k.startswith("transformer.") for k in keys)
    assert any(k.endswith("attn.to_q.lora_A.weight") for k in keys)
    assert any(k.endswith("attn.to_out.0.lora_B.weight") for k in keys)
    assert meta["transformer.r"] == 4
    assert summary["extra"]["validation_grids"] == ["validation/step_000004.png"]
    assert (out / "validation" / "step_000004.png").is_file()


def test_sd3_lora_loads_and_changes_the_image(trained, tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    _, out = trained
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)

    def generate():
        return sample(pipe, guidance_scale=1.0)

    before = generate()
    pipe.load_lora_weights(out)
    after = generate()
    assert (after - before).abs().max() > 1e-3

    # The registry's loader (base pipeline + the run's LoRA) gives the same image.
    from sdtune.config import load_config
    from sdtune.registry import load_trained_pipeline

    loaded = load_trained_pipeline(load_config(trained[0]), out)
    assert isinstance(loaded, StableDiffusion3Pipeline)
    loaded.set_progress_bar_config(disable=True)
    pipe = loaded
    assert torch.allclose(generate(), after)


def test_sd3_resume_is_exact(trained, tiny_sd3, stage_dir, tmp_path):
    """A run restarted from the step-2 checkpoint ends with the uninterrupted run's weights, bit for bit."""
    config, out = trained
    resumed = tmp_path / "out"
    (resumed / "checkpoints").mkdir(parents=True)
    shutil.copytree(out / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(resumed)]) == 0
    summary = json.loads((resumed / "train_summary.json").read_text())
    assert summary["extra"]["resumed_from_step"] == 2
    a = load_file(out / "pytorch_lora_weights.safetensors")
    b = load_file(resumed / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_sd3_evaluate_computes_flow_loss_and_grid(trained, tiny_sd3, stage_dir, tmp_path):
    from sdtune.config import load_config
    from sdtune.evaluate import evaluate

    config, out = trained
    cfg = load_config(config)
    metrics = evaluate(cfg, str(tiny_sd3), out, stage_dir, tmp_path / "eval")
    assert all(math.isfinite(metrics[k]) for k in ("loss_base_trigger", "loss_tuned_trigger"))
    assert metrics["loss_delta_trigger"] != 0.0
    info = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert info["loss_objective"] == "flow_matching"
    assert (tmp_path / "eval" / "grid.png").is_file()


@pytest.mark.parametrize(
    "extra, message",
    [
        (
            ["train.method=inpaint"],
            "lora / textual_inversion / pivotal / dreambooth / full only (not inpaint)",
        ),
        (["train.snr_gamma=5"], "train.snr_gamma=5.0 is not supported for model.arch=sd3"),
    ],
)
def test_sd3_refusals_exit_2(tmp_path, tiny_sd3, stage_dir, capsys, extra, message):
    config = _config(tmp_path / "c.yaml", tiny_sd3)
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(tmp_path / "o")]
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
