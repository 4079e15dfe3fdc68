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
        "tiny seed job 64px b4 pivotal-te r32 eager",
        "tiny 64px b1 lora r4 graphs",
        "tiny 64px b1 lora r4 compile",
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
        assert row["gpu_busy_ms_per_step"] is None
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
    # The seed job graphed (the <= 240 ms/step goal) comes right after the two eager references; with
    # SD 1.5's compile first (142 s on the H100) the run's budget never reached it. Expected to fit in the
    # recommended `--quick --budget-s 470` (one call of <= 8 minutes), with the rest skipped or stopped.
    assert names[:7] == [
        "sd15 512px b1 lora r4 eager",
        "seed job 768px b4 pivotal-te r32 eager",
        "seed job 768px b4 pivotal-te r32 graphs",
        "sd15 512px b1 lora r4 graphs",
        "seed job 768px b4 pivotal-frozen r32 graphs",
        "sd15 512px b1 lora r4 compile",
        "seed job 768px b4 pivotal-frozen r32 eager",
    ]
    timed = 3 + 10 * 3 + 4  # --quick
    cases = gpu.plan(args)
    first_three = sum(gpu.expected_seconds(c, timed) for c in cases[:3])
    assert first_three < 470 < sum(gpu.expected_seconds(c, timed) for c in cases)
    assert "sd15 512px b16 lora r4 graphs" in names and "sdxl 768px b8 lora r32 graphs" in names


def test_the_budget_stops_a_running_case_and_keeps_what_was_measured(tmp_path):
    """``--budget-s`` ends the run in time: the case running when the budget ends is stopped (an alarm), the
    rest are skipped, and the JSON and markdown are written, so the process exits before it is killed."""
    gpu = _load_gpu_script()
    only = "tiny 64px b1 lora r4 eager,pivotal-te r32 eager"
    assert gpu.main(["--out", str(tmp_path), "--cpu-tiny", "--only", only, "--budget-s", "0.2"]) == 1
    rows = json.loads((tmp_path / "gpu_bench.json").read_text())["rows"]
    assert [r["case"] for r in rows] == [
        "tiny 64px b1 lora r4 eager",
        "tiny seed job 64px b4 pivotal-te r32 eager",
    ]
    assert rows[0]["error"].startswith("BudgetSpent: stopped") and "BudgetSpent" in rows[0]["traceback"]
    assert rows[1]["error"].startswith("skipped:")
    assert "| tiny 64px b1 lora r4 eager |" in (tmp_path / "gpu_bench.md").read_text()


def test_a_missing_dependency_stops_the_run_before_any_case(tmp_path, monkeypatch, capsys):
    gpu = _load_gpu_script()
    monkeypatch.setattr(gpu, "REQUIRED", (*gpu.REQUIRED, "sdtune_no_such_module"))
    assert gpu.main(["--out", str(tmp_path), "--cpu-tiny"]) == 2
    assert "cannot import sdtune_no_such_module" in capsys.readouterr().err
    assert not (tmp_path / "gpu_bench.json").exists()


@pytest.mark.parametrize(
    ("name", "peak"),
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA H100 80GB HBM3 MIG 1g.10gb", None),  # a slice: the chip's peak would understate the MFU
    ],
)
def test_peak_flops_by_card_name(monkeypatch, name, peak):
    gpu = _load_gpu_script()
    monkeypatch.setattr(gpu.torch.cuda, "get_device_name", lambda device=None: name)
    assert gpu.peak_flops(gpu.torch.device("cuda")) == (name, peak)


def test_gpu_busy_time_sums_the_device_events_only():
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    gpu = _load_gpu_script()
    events = [
        SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=30_000.0),  # µs, two steps
        SimpleNamespace(device_type=DeviceType.CUDA, self_device_time_total=10_000.0),
        SimpleNamespace(device_type=DeviceType.CPU, self_device_time_total=99_000.0),  # the launching op
    ]
    assert gpu.gpu_busy_ms(events, steps=2) == 20.0
    assert gpu.gpu_busy_ms(events[2:], steps=2) is None
