"""Checkpoints and resume: atomic writes, torn checkpoints never used, incompatible ones refused, and a run
killed with SIGKILL (or stopped with SIGTERM) at random steps ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.config import config_from_dict
from sdtune.errors import EXIT_PREEMPTED, CheckpointError
from sdtune.train import checkpoint as C
from sdtune.train.data import EpochSampler
from tests.train.conftest import write_config


class OneProcess:
    """The part of an Accelerator the checkpoint functions use, for one process."""

    is_main_process = True
    num_processes = 1
    process_index = 0

    def wait_for_everyone(self):
        pass


def toy_state(seed: int = 0) -> C.TrainState:
    torch.manual_seed(seed)
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return C.TrainState(
        modules={"m": model},
        optimizer=opt,
        lr_scheduler=sched,
        generators={"noise": torch.Generator().manual_seed(seed)},
        samplers={"data": EpochSampler(5, 2, seed)},
    )


def toy_step(state: C.TrainState) -> None:
    model = state.modules["m"]
    idx = next(state.samplers["data"])
    x = torch.randn((len(idx), 3), generator=state.generators["noise"]) + idx[:, None]
    model(x).pow(2).mean().backward()
    state.optimizer.step()
    state.lr_scheduler.step()
    state.optimizer.zero_grad()


def toy_cfg(tmp_path: Path, **train):
    return config_from_dict(
        {"train": {"checkpoint_dir": str(tmp_path / "ck"), "keep_checkpoints": 5, **train}}
    )


def test_save_resume_is_exact_and_prunes(tmp_path):
    cfg = toy_cfg(tmp_path, keep_checkpoints=2)
    ref = toy_state()
    for _ in range(7):
        toy_step(ref)

    run = toy_state()
    for step in range(1, 5):
        toy_step(run)
        if step % 2 == 0:
            C.save(cfg, tmp_path, step, run, OneProcess())
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == ["latest", "step-00000002", "step-00000004"]
    assert (tmp_path / "ck" / "latest").read_text().strip() == "step-00000004"

    resumed = toy_state(seed=123)  # different init and RNG: everything must come from the checkpoint
    found = C.find(cfg, tmp_path, 1, "")
    assert found.step == 4 and C.load(found, resumed, OneProcess()) == 4 and resumed.attempt == 1
    for _ in range(3):
        toy_step(resumed)
    for key, value in ref.modules["m"].state_dict().items():
        assert torch.equal(value, resumed.modules["m"].state_dict()[key]), key

    C.save(cfg, tmp_path, 6, resumed, OneProcess())  # keep 2: step 2 goes, only after 6 is complete
    assert [s for s, _ in C.list_complete(str(tmp_path / "ck"))] == [6, 4]


def test_torn_checkpoints_are_never_used(tmp_path):
    cfg = toy_cfg(tmp_path)
    state = toy_state()
    for step in (2, 4, 6):
        toy_step(state)
        C.save(cfg, tmp_path, step, state, OneProcess())
    root = tmp_path / "ck"
    # Killed mid-write, three ways: a temp folder, a folder without its manifest, a damaged file.
    (root / ".tmp-step-00000010-dead").mkdir()
    (root / ".tmp-step-00000010-dead" / C.WEIGHTS).write_bytes(b"half")
    no_manifest = root / "step-00000008"
    no_manifest.mkdir()
    (no_manifest / C.META).write_text("{}")
    damaged = root / "step-00000006" / C.OPTIM
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))

    with pytest.warns(UserWarning, match="skipping torn checkpoint .*step-00000006.*sha256"):
        found = C.find(cfg, tmp_path, 1, "")
    assert found.step == 4
    with pytest.raises(CheckpointError, match="not a usable checkpoint .*sha256"):
        C.find(
            cfg.model_copy(
                update={"train": cfg.train.model_copy(update={"resume": str(root / "step-00000006")})}
            ),
            tmp_path,
            1,
            "",
        )
    C.save(cfg, tmp_path, 12, state, OneProcess())  # the next save cleans the unfinished leftovers
    assert sorted(p.name for p in root.iterdir() if p.name != "latest") == [
        "step-00000002",
        "step-00000004",
        "step-00000006",
        "step-00000012",  # 6: damaged, kept for a look
    ]


def test_incompatible_checkpoints_are_refused(tmp_path):
    cfg = toy_cfg(tmp_path)
    state = toy_state()
    C.save(cfg, tmp_path, 2, state, OneProcess())
    changed = toy_cfg(tmp_path, learning_rate=5e-4, log_every=7)  # log_every is operational: not listed
    with pytest.raises(CheckpointError, match=r"another training config \(train.learning_rate changed\)"):
        C.find(changed, tmp_path, 1, "")
    with pytest.raises(CheckpointError, match="written by 1 processes, this run has 2"):
        C.find(cfg, tmp_path, 2, "")
    assert C.find(toy_cfg(tmp_path, resume="never"), tmp_path, 1, "") is None
    assert (
        C.find(toy_cfg(tmp_path, max_steps=9999, checkpoint_every=3), tmp_path, 1, "").step == 2
    )  # constant lr


def test_checkpoints_on_s3(tmp_path, s3_endpoint, monkeypatch):
    from sdtune.data.s3 import client_from_env
    from tests.servers import ACCESS_KEY, SECRET_KEY, make_bucket

    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    make_bucket(s3_endpoint.url, "ckpt")
    cfg = toy_cfg(tmp_path, checkpoint_dir="s3://ckpt/run1/checkpoints", keep_checkpoints=2)
    state = toy_state()
    for step in (2, 4, 6):
        toy_step(state)
        C.save(cfg, tmp_path, step, state, OneProcess())
    client = client_from_env()
    keys = sorted(
        o.object_name for o in client.list_objects("ckpt", prefix="run1/checkpoints/", recursive=True)
    )
    assert not any("step-00000002" in k for k in keys)  # pruned after step 6 completed
    assert "run1/checkpoints/step-00000006/COMPLETE" in keys
    assert client.get_object("ckpt", "run1/checkpoints/latest").read().decode().strip() == "step-00000006"
    # A torn upload (files, no COMPLETE marker) is not a checkpoint.
    client.fput_object(
        "ckpt",
        "run1/checkpoints/step-00000008/trainable.safetensors",
        str(Path(C.fetch("s3://ckpt/run1/checkpoints/step-00000006/")) / C.WEIGHTS),
    )
    resumed = toy_state(seed=5)
    found = C.find(cfg, tmp_path, 1, "")
    assert found.step == 6 and found.location == "s3://ckpt/run1/checkpoints/step-00000006/"
    C.load(found, resumed, OneProcess())
    assert torch.equal(resumed.modules["m"].weight, state.modules["m"].weight)


def test_checkpoints_on_unreachable_s3_are_a_service_error(tmp_path, monkeypatch):
    """One line and exit 4 (retryable), not urllib3's MaxRetryError, when the checkpoint store is down."""
    from sdtune.errors import ServiceError

    monkeypatch.setenv("S3_ENDPOINT_URL", "http://127.0.0.1:9")  # nothing listens: connection refused
    cfg = toy_cfg(tmp_path, checkpoint_dir="s3://ckpt/run1/checkpoints")
    with pytest.raises(ServiceError, match="checkpoint s3://ckpt/run1/checkpoints: cannot reach S3") as info:
        C.find(cfg, tmp_path, 1, "")  # resume=auto lists the checkpoints first
    assert info.value.exit_code == 4


# ------------------------------------------------------------------------------------- the real recipe


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "pytorch_lora_weights.safetensors"))


def _assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{what}: {len(differ)} tensors differ, e.g. {differ[0]}"


def test_changed_config_refuses_to_resume_exit_2(tmp_path, tiny_sd15, stage_dir, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_sd15)
    out = tmp_path / "out"
    args = ["train", "--config", str(config), "--data", str(stage_dir), "--out", str(out)]
    assert main([*args, "train.checkpoint_every=2"]) == 0
    assert (out / "checkpoints" / "step-00000002" / C.MANIFEST).is_file()
    capsys.readouterr()
    assert main([*args, "train.rank=8"]) == 2
    err = capsys.readouterr().err
    assert "another training config (train.rank changed)" in err and "train.resume=never" in err
    assert main([*args, "train.rank=8", "train.resume=never"]) == 0


def test_non_finite_loss_writes_no_checkpoint_and_names_the_batch(
    tmp_path, tiny_config, stage_dir, monkeypatch, capsys
):
    import sdtune.train.losses as losses

    real = losses.diffusion_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] == 2 else loss

    monkeypatch.setattr(losses, "diffusion_loss", poisoned)
    out = tmp_path / "o"
    # log_every=4 (the first host check after the NaN) but a checkpoint due at step 2: it must not be written.
    code = main(
        [
            "train",
            "--config",
            str(tiny_config),
            "--data",
            str(stage_dir),
            "--out",
            str(out),
            "train.checkpoint_every=2",
            "train.log_every=4",
        ]
    )
    assert code == 3
    err = capsys.readouterr().err
    assert (
        "not finite at step 2" in err
        and "rank 0 batch ['img_" in err
        and "without writing a checkpoint" in err
    )
    assert not (out / "checkpoints").exists() or not list((out / "checkpoints").glob("step-*"))


def _train_cmd(config: Path, data: Path, out: Path, *overrides: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sdtune.cli",
        "train",
        "--config",
        str(config),
        "--data",
        str(data),
        "--out",
        str(out),
        *overrides,
    ]


def _run_until_step(cmd: list[str], metrics: Path, step: int, sig: int, timeout: float = 120) -> int:
    """Start the trainer; send ``sig`` as soon as ``metrics.jsonl`` shows ``step``; return its exit code."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if metrics.is_file():
                steps = [
                    json.loads(line)["step"] for line in metrics.read_text().splitlines() if line.strip()
                ]
                if steps and max(steps) >= step:
                    proc.send_signal(sig)
                    break
            time.sleep(0.005)
        _, err = proc.communicate(timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode is not None, err.decode()[-2000:]
    return proc.returncode if proc.returncode >= 0 else -proc.returncode + 128


@pytest.mark.slow
def test_killed_at_random_steps_resumes_bit_identical(tmp_path, tiny_sd15, stage_dir):
    """SIGKILL, SIGTERM, SIGKILL at three random steps of one run, resumed each time; then compared with an
    uninterrupted run. The kill lands wherever the trainer is (mid-step, mid-checkpoint-write)."""
    steps = 14
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "max_steps": steps,
            "log_every": 1,
            "checkpoint_every": 3,
            "keep_checkpoints": 2,
            "lr_scheduler": "cosine",
            "lr_warmup_steps": 2,
            "batch_size": 2,
            "noise_offset": 0.05,
        },
    )
    reference = tmp_path / "reference"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(stage_dir),
                "--out",
                str(reference),
                "train.checkpoint_every=0",
            ]
        )
        == 0
    )

    out = tmp_path / "interrupted"
    rng = random.Random()
    kills = sorted(rng.sample(range(2, steps - 1), 3))
    signals = [signal.SIGKILL, signal.SIGTERM, signal.SIGKILL]
    for at, sig in zip(kills, signals, strict=True):
        code = _run_until_step(_train_cmd(config, stage_dir, out), out / "metrics.jsonl", at, sig)
        expected = 128 + 9 if sig == signal.SIGKILL else EXIT_PREEMPTED
        assert code == expected, f"kills at {kills}: signal {sig} at step {at} gave exit {code}"
        if sig == signal.SIGTERM:  # a checkpoint of the step it stopped after
            newest = C.list_complete(str(out / "checkpoints"))[0][0]
            assert newest >= at, f"SIGTERM at step {at}: newest checkpoint {newest}"
    final = subprocess.run(
        _train_cmd(config, stage_dir, out),
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        timeout=180,
    )
    assert final.returncode == 0, final.stderr.decode()[-2000:]
    _assert_bit_identical(_weights(reference), _weights(out), f"kills at steps {kills}")
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"]["attempt"] >= 1 and summary["extra"]["resumed_from_step"] > 0
    rows = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rows == list(range(1, steps + 1)), "metrics.jsonl reads as one uninterrupted run"
