"""Launching training as a child process: argv, signal forwarding, and a real 2-process torchrun on CPU."""

from __future__ import annotations

import json
import os
import signal
import sys
import threading

import pytest

from sdtune.train import launch
from sdtune.train.launch import launch_training, training_command


def test_command_one_process(tmp_path):
    cmd = training_command(
        tmp_path / "c.yaml", tmp_path / "d", tmp_path / "o", 1, "run123", ["train.rank=8"], env={}
    )
    assert cmd[:3] == [sys.executable, "-m", "sdtune.cli"]
    assert cmd[3:] == [
        "train",
        "--config",
        str(tmp_path / "c.yaml"),
        "--data",
        str(tmp_path / "d"),
        "--out",
        str(tmp_path / "o"),
        "--mlflow-run-id",
        "run123",
        "train.rank=8",
    ]


def test_command_torchrun_single_and_multi_node(tmp_path):
    cmd = training_command(tmp_path / "c.yaml", tmp_path / "d", tmp_path / "o", 8, None, env={})
    assert cmd[:5] == [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=8", "--standalone"]
    assert cmd[5:8] == ["-m", "sdtune.cli", "train"] and "--mlflow-run-id" not in cmd

    env = {"SDTUNE_NNODES": "2", "SDTUNE_NODE_RANK": "1", "SDTUNE_RDZV_ENDPOINT": "head:29500"}
    cmd = training_command(tmp_path / "c.yaml", tmp_path / "d", tmp_path / "o", 8, None, env=env)
    assert "--nnodes=2" in cmd and "--node_rank=1" in cmd and "--rdzv_endpoint=head:29500" in cmd
    assert "--standalone" not in cmd


@pytest.mark.parametrize(("child_code", "returned"), [(7, 75), (75, 75), (3, 3)])
def test_sigterm_is_forwarded_and_exit_code_returned(tmp_path, monkeypatch, child_code, returned):
    """A run stopped by a forwarded SIGTERM is retryable (75: torchrun itself exits 1 on a signal), unless it
    failed permanently on the way (3: diverged)."""
    ready = tmp_path / "ready"
    child = (
        "import signal, sys, time, pathlib\n"
        f"signal.signal(signal.SIGTERM, lambda *a: sys.exit({child_code}))\n"
        f"pathlib.Path({str(ready)!r}).touch()\n"
        "time.sleep(60)\n"
        "sys.exit(0)\n"
    )
    monkeypatch.setattr(launch, "training_command", lambda *a, **k: [sys.executable, "-c", child])

    def send_term():
        for _ in range(200):
            if ready.exists():
                break
            threading.Event().wait(0.05)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=send_term, daemon=True).start()
    assert launch_training(tmp_path / "c.yaml", tmp_path, tmp_path / "o", 1, None) == returned
    assert signal.getsignal(signal.SIGTERM) is not None  # handler restored (pytest's default)


@pytest.mark.slow
def test_torchrun_two_processes_on_cpu(tmp_path, tiny_config, stage_dir):
    """gloo DDP, 2 ranks: exit 0, one set of outputs, written once (rank 0 alone)."""
    out = tmp_path / "ddp"
    code = launch_training(tiny_config, stage_dir, out, 2, None, ["train.max_steps=4", "train.log_every=2"])
    assert code == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["steps"] == 4
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 2  # not duplicated by rank 1
    assert sorted(p.name for p in out.iterdir()) == [
        "README.md",
        "config.yaml",
        "lora_kohya.safetensors",
        "metrics.jsonl",
        "pytorch_lora_weights.safetensors",
        "train_summary.json",
    ]


def test_torchrun_grace_comes_from_the_config_object_when_given(tmp_path, monkeypatch):
    """A caller holding the parsed config passes it: the config file is not read again (here it does not even
    exist) and torchrun's shutdown timeout is the config's preempt grace + 30 s."""
    from sdtune.config import RunConfig

    seen = tmp_path / "env.txt"
    child = f"import os, pathlib; pathlib.Path({str(seen)!r}).write_text(os.environ['TORCH_ELASTIC_SHUTDOWN_TIMEOUT'])"
    monkeypatch.setattr(launch, "training_command", lambda *a, **k: [sys.executable, "-c", child])
    monkeypatch.delenv("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", raising=False)
    cfg = RunConfig()
    cfg.train.preempt_grace_s = 7
    assert launch_training(tmp_path / "missing.yaml", tmp_path, tmp_path / "o", 2, None, cfg=cfg) == 0
    assert seen.read_text() == "37"
