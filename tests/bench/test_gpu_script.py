"""sdtune/bench/gpu.py runs end to end on the CPU at a tiny size, so the GPU benchmark cannot rot between GPU runs."""

from __future__ import annotations

import importlib
import json

import pytest


def _load_gpu_script():
    return importlib.import_module("sdtune.bench.gpu")


def test_cpu_tiny_writes_json_and_markdown(tmp_path):
    gpu = _load_gpu_script()
    only = (
        "tiny 64px b1 lora r4 eager,tiny 64px b1 lora r4 compile,tiny 64px b1 lora r4 graphs,"
        "pivotal-te r32 eager,pivotal-frozen r32 eager,pivotal-te r32 compile"
    )
    assert gpu.main(["--out", str(tmp_path), "--cpu-tiny", "--only", only]) == 0
    result = json.loads((tmp_path / "gpu_bench.json").read_text())
    rows = {r["case"]: r for r in result["rows"]}
    assert list(rows) == [
        "tiny 64px b1 lora r4 eager",
        "tiny 64px b1 lora r4 compile",
        "tiny 64px b1 lora r4 graphs",
        "tiny seed job 64px b4 pivotal-te r32 eager",
        "tiny seed job 64px b4 pivotal-frozen r32 eager",
        "tiny seed job 64px b4 pivotal-te r32 compile",
    ]
    assert rows["tiny 64px b1 lora r4 graphs"]["error"] == "skipped: CUDA graphs need a CUDA GPU"
    measured = [r for r in rows.values() if "error" not in r]
    assert len(measured) == 5
    for row in measured:
        assert row["steps_per_sec"] > 0 and row["flops_per_step"] > 0 and row["loss"] == row["loss"]
        assert row["host_enqueue_ms"] > 0 and row["aten_ops_per_step"] > 0 and row["top_self_cpu"]
        assert row["kernel_launches_per_step"] is None and row["syncs_per_step"] is None  # CUDA only
    # dynamo's guards run before every compiled call and never in eager mode
    assert rows["tiny 64px b1 lora r4 compile"]["guard_ms_per_step"] > 0
    assert rows["tiny 64px b1 lora r4 eager"]["guard_ms_per_step"] == 0
    te, frozen = (
        rows["tiny seed job 64px b4 pivotal-te r32 eager"],
        rows["tiny seed job 64px b4 pivotal-frozen r32 eager"],
    )
    # the embedding phase trains the 2 new rows of both encoders too, and backpropagates through them
    assert te["trainable_params"] == frozen["trainable_params"] + 2 * 32 * 2
    assert te["flops_per_step"] > frozen["flops_per_step"]
    assert result["meta"]["peak_bf16_flops"] is None  # no MFU on a CPU
    # The planner's host floor beside each measurement: fewer kernels compiled, more with the encoders' backward.
    eager, compiled = rows["tiny 64px b1 lora r4 eager"], rows["tiny 64px b1 lora r4 compile"]
    assert eager["planned_forward_kernels"] == compiled["planned_forward_kernels"] > 0
    assert 0 < compiled["planned_host_ms"] < eager["planned_host_ms"]
    assert te["planned_host_ms"] > frozen["planned_host_ms"] > 0
    # The compiled seed job: UNet and text encoders compiled (dynamo's guards run before each), same math.
    te_compiled = rows["tiny seed job 64px b4 pivotal-te r32 compile"]
    assert te_compiled["guard_ms_per_step"] > 0 and te_compiled["flops_per_step"] == te["flops_per_step"]
    assert te_compiled["loss"] == pytest.approx(te["loss"], rel=1e-3)
    md = (tmp_path / "gpu_bench.md").read_text()
    assert "| tiny 64px b1 lora r4 eager |" in md and "host enqueue ms/step" in md
    assert "planned host floor ms" in md
    assert "dynamo guards" in md


def test_plan_puts_the_most_wanted_cases_first():
    gpu = _load_gpu_script()
    assert gpu.SD15_UNET["block_out_channels"] == [320, 640, 1280, 1280]
    assert gpu.SDXL_UNET["transformer_layers_per_block"] == [1, 2, 10]
    assert dict(gpu.PEAK_BF16)["H100"] == 989e12 and dict(gpu.PEAK_BF16)["H200"] == 989e12
    args = type("A", (), {"cpu_tiny": False, "quick": True, "only": ""})()
    names = [c.name for c in gpu.plan(args)]
    assert names[:3] == [
        "sd15 512px b1 lora r4 eager",
        "sd15 512px b1 lora r4 compile",
        "sd15 512px b1 lora r4 graphs",
    ]
    assert names[3:7] == [
        "seed job 768px b4 pivotal-te r32 eager",
        "seed job 768px b4 pivotal-te r32 graphs",
        "seed job 768px b4 pivotal-frozen r32 eager",
        "seed job 768px b4 pivotal-frozen r32 graphs",
    ]
    assert "sd15 512px b16 lora r4 graphs" in names and "sdxl 768px b8 lora r32 graphs" in names
