"""sdtune/bench/gpu.py runs end to end on the CPU at a tiny size, so the GPU benchmark cannot rot between GPU runs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_gpu_script():
    spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "sdtune" / "bench" / "gpu.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cpu_tiny_writes_json_and_markdown(tmp_path):
    gpu = _load_gpu_script()
    assert gpu.main(["--out", str(tmp_path), "--cpu-tiny"]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = result["rows"]
    assert [r["case"] for r in rows] == [
        "tiny 64px b1 eager",
        "tiny 64px b1 eager+channels_last",
        "tiny 64px b2 eager",
    ]
    for row in rows:
        assert "error" not in row, row
        assert row["steps_per_sec"] > 0 and row["flops_per_step"] > 0 and row["loss"] == row["loss"]
        assert row["minutes_per_1000_steps"] > 0 and row["lora_params"] > 0
    assert rows[2]["flops_per_step"] > 1.5 * rows[0]["flops_per_step"]  # batch 2 does about twice the math
    assert result["meta"]["peak_bf16_flops"] is None  # no MFU on a CPU
    assert "| tiny 64px b1 eager |" in (tmp_path / "gpu_bench.md").read_text()


def test_real_configs_and_peaks():
    gpu = _load_gpu_script()
    assert gpu.SD15_UNET["block_out_channels"] == [320, 640, 1280, 1280]
    assert gpu.SDXL_UNET["transformer_layers_per_block"] == [1, 2, 10]
    assert dict(gpu.PEAK_BF16)["H100"] == 989e12 and dict(gpu.PEAK_BF16)["H200"] == 989e12
    names = [c.name for c in gpu.plan(type("A", (), {"cpu_tiny": False, "quick": True})())]
    assert (
        "sd15 512px b1 eager" in names
        and "sdxl 1024px b1 compile" in names
        and "sd15 512px b16 eager" in names
    )
