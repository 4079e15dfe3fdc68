"""train.mixed_precision on a CPU: bf16 where the CPU has bf16 instructions, fp32 with a warning elsewhere."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.config import RunConfig
from sdtune.train.runtime import cpu_precision, make_accelerator
from tests.train.conftest import write_config


@pytest.mark.parametrize(
    ("requested", "capabilities", "used", "why"),
    [
        ("no", {}, "no", None),
        ("bf16", {"avx512_bf16": True}, "bf16", None),
        ("bf16", {"amx_bf16": True, "avx512_bf16": False}, "bf16", None),
        ("bf16", {"avx512_bf16": False, "avx2": True}, "no", "no bf16 instructions"),
        ("fp16", {"avx512_bf16": True}, "no", "fp16 is slow on CPUs"),
    ],
)
def test_cpu_precision(requested, capabilities, used, why):
    got, reason = cpu_precision(requested, capabilities)
    assert got == used
    if why is None:
        assert reason is None
    else:
        assert why in reason and f"train.mixed_precision={requested} ignored on CPU" in reason


def test_one_process_can_train_at_another_precision(monkeypatch):
    """accelerate keeps the first Accelerator's precision process-wide; the next run's replaces it."""
    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: {"avx512_bf16": True})
    for precision in ("no", "bf16", "no"):
        tc = RunConfig.model_validate({"train": {"mixed_precision": precision}}).train
        assert make_accelerator(tc).mixed_precision == precision


def _train(tmp_path, tiny_sd15, stage_dir, precision: str) -> tuple[dict, list[float]]:
    out = tmp_path / precision
    config = write_config(tmp_path / f"{precision}.yaml", tiny_sd15)
    assert main(["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out),
                 f"train.mixed_precision={precision}"]) == 0  # fmt: skip
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "train_summary.json").read_text()), losses


def test_bf16_on_this_cpu_runs_as_the_cpu_allows(tmp_path, tiny_sd15, stage_dir):
    """On a CPU with bf16 instructions the run trains under bf16 autocast (other losses than fp32, fp32 LoRA
    weights); on one without, it warns and trains exactly the fp32 run. Summary and card say what ran."""
    fp32, fp32_losses = _train(tmp_path, tiny_sd15, stage_dir, "no")
    expected, why = cpu_precision("bf16")
    if why:
        with pytest.warns(UserWarning, match="no bf16 instructions"):
            summary, losses = _train(tmp_path, tiny_sd15, stage_dir, "bf16")
        assert losses == fp32_losses
    else:
        summary, losses = _train(tmp_path, tiny_sd15, stage_dir, "bf16")
        assert all(torch.isfinite(torch.tensor(losses)))
        assert losses != fp32_losses  # bf16 maths rounds differently
        assert losses == pytest.approx(fp32_losses, rel=0.05)  # … but trains the same run
    assert fp32["extra"]["mixed_precision"] == "no"
    assert summary["extra"]["mixed_precision"] == expected
    assert f"| mixed precision | {expected} |" in (tmp_path / "bf16" / "README.md").read_text()
    weights = load_file(tmp_path / "bf16" / "pytorch_lora_weights.safetensors")
    assert {w.dtype for w in weights.values()} == {torch.float32}
