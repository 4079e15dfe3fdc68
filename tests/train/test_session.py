"""The training session on its own, with a one-weight model: the loop every recipe shares (accumulation,
clipping, optimizer step, hooks, logging), exact resume, and a clean exit when the recipe's body fails."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch

from sdtune.config import RunConfig
from sdtune.train import data as D
from sdtune.train.session import Session
from tests.module_imports import imported_names
from tests.train.conftest import make_stage

STEPS, ACCUMULATE, BATCH = 3, 2, 2
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stage(tmp_path_factory):
    return make_stage(tmp_path_factory.mktemp("session") / "stage", n=5, holdout=1)  # 4 train records


def _cfg(**train) -> RunConfig:
    cfg = RunConfig()
    settings = dict(
        max_steps=STEPS,
        gradient_accumulation_steps=ACCUMULATE,
        batch_size=BATCH,
        optimizer="sgd",
        learning_rate=0.1,
        max_grad_norm=0.5,
        log_every=1,
    )
    for key, value in {**settings, **train}.items():
        setattr(cfg.train, key, value)
    return cfg


def _run(cfg, stage, out, calls=None) -> tuple[torch.Tensor, dict]:
    """A one-weight 'recipe': loss = mean over the batch of (w · x_i − 1)², x_i = i + 1."""
    calls = calls if calls is not None else {"body": 0, "after_step": 0, "save": 0}
    with Session(cfg, stage, out) as session:
        model = torch.nn.Linear(1, 1, bias=False)
        with torch.no_grad():
            model.weight.fill_(1.0)
        x = torch.arange(1.0, len(session.records) + 1.0).reshape(-1, 1)

        def after_step():
            calls["after_step"] += 1

        def save(out):
            calls["save"] += 1
            (out / "w.txt").write_text(str(float(model.weight.detach())))
            return ["w.txt"]

        model = session.start(
            {"w": model},
            list(model.parameters()),
            after_step=after_step,
            metrics=lambda: {"w": float(model.weight.detach())},
            validate=False,
            desc="test",
        )["w"]
        for idx in session.steps():
            calls["body"] += 1
            session.backward(((model(x[idx]) - 1.0) ** 2).mean())
        result = session.finish("test", save, answer=42)
    return model.weight.detach().clone(), {"calls": calls, "result": result}


def _reference(n: int, steps: int, tc) -> tuple[torch.Tensor, list[float], list[float]]:
    """The documented step, written out: accumulate loss/N over N micro-batches, clip, SGD, per step."""
    w = torch.nn.Parameter(torch.ones(1, 1))
    opt = torch.optim.SGD([w], lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)
    sampler = D.EpochSampler(n, tc.batch_size, tc.seed)
    x = torch.arange(1.0, n + 1.0).reshape(-1, 1)
    logged, norms = [], []
    for _ in range(steps):
        losses = []
        for _ in range(tc.gradient_accumulation_steps):
            idx = next(sampler)
            loss = ((x[idx] @ w.T - 1.0) ** 2).mean()
            (loss / tc.gradient_accumulation_steps).backward()
            losses.append(float(loss.detach()))
        norms.append(float(torch.nn.utils.clip_grad_norm_([w], tc.max_grad_norm)))
        opt.step()
        opt.zero_grad()
        logged.append(sum(losses) / len(losses))
    return w.detach(), logged, norms


def test_the_loop_accumulates_clips_steps_logs_and_saves(tmp_path, stage):
    cfg = _cfg()
    weight, info = _run(cfg, stage, tmp_path / "out")
    expected_weight, expected_losses, expected_norms = _reference(4, STEPS, cfg.train)
    assert info["calls"] == {"body": STEPS * ACCUMULATE, "after_step": STEPS, "save": 1}
    assert torch.allclose(weight, expected_weight, rtol=0, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert [r["loss"] for r in rows] == pytest.approx(expected_losses, rel=1e-6)
    assert rows[-1]["w"] == pytest.approx(float(expected_weight))  # the recipe's extra metric
    assert [r["grad_norm"] for r in rows] == pytest.approx(expected_norms, rel=1e-5)
    assert all(n > cfg.train.max_grad_norm for n in expected_norms)  # so the clipping did act
    summary = json.loads((tmp_path / "out" / "train_summary.json").read_text())
    assert summary["method"] == "test" and summary["files"] == ["w.txt"]
    assert (tmp_path / "out" / "w.txt").read_text() == str(float(weight))
    assert summary["extra"] == {
        "answer": 42,
        "resumed_from_step": 0,
        "attempt": 0,
        "gradient_checkpointing": False,  # auto, on a CPU
        "gradient_checkpointing_reason": "auto: no GPU, nothing to save accelerator memory for",
        "mixed_precision": "no",
    }


def test_a_resumed_session_continues_the_same_run(tmp_path, stage):
    cfg, out = _cfg(max_steps=4, checkpoint_every=2), tmp_path / "out"
    straight, _ = _run(cfg, stage, out)  # leaves a checkpoint of step 2
    rows = (out / "metrics.jsonl").read_text()
    resumed, info = _run(cfg, stage, out)  # the rerun continues from it
    assert info["result"].extra["resumed_from_step"] == 2 and info["result"].extra["attempt"] == 1
    assert info["calls"]["body"] == 2 * ACCUMULATE  # steps 3 and 4 only
    assert torch.equal(resumed, straight)
    assert (out / "metrics.jsonl").read_text().count("\n") == rows.count("\n") == 4
    again = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert again == [json.loads(line)["loss"] for line in rows.splitlines()]


def test_a_failing_body_leaves_the_process_clean(tmp_path, stage):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError, match="recipe bug"), Session(_cfg(), stage, tmp_path / "o") as session:
        model = torch.nn.Linear(1, 1, bias=False)
        session.start({"m": model}, list(model.parameters()), validate=False, desc="t")
        for _ in session.steps():
            raise RuntimeError("recipe bug")
    assert signal.getsignal(signal.SIGTERM) is before  # the SIGTERM watch is gone
    assert session._loop is None or session._loop.gi_frame is None  # the loop's contexts were left


def test_import_directions():
    """Recipes are reached only through the family table: no module of the training room imports one (the
    session knows no method), and the model layer never imports the training room (docs/architecture.md)."""
    from sdtune.models.families import FAMILIES

    recipes = {f"sdtune.train.{m}" for family in FAMILIES.values() for m in family.methods.values()}
    assert {"sdtune.train.lora", "sdtune.train.sd3_lora"} <= recipes
    for path in sorted((REPO / "sdtune" / "train").glob("*.py")):
        wrong = imported_names(path, REPO) & recipes
        assert not wrong, f"{path.name} imports the recipe(s) {sorted(wrong)}"
    for path in sorted((REPO / "sdtune" / "models").glob("*.py")):
        wrong = sorted(n for n in imported_names(path, REPO) if n.startswith("sdtune.train"))
        assert not wrong, f"models/{path.name} imports {wrong}"


@pytest.mark.parametrize("setting, enabled", [("auto", False), (True, True), (False, False)])
def test_the_session_applies_the_resolved_gradient_checkpointing(tmp_path, stage, setting, enabled):
    """auto on a CPU is off (no accelerator memory to save); an explicit setting is applied as given — to the
    frozen base (place) and to a full fine-tune's UNet (trainable_unet) — and recorded in the summary."""
    from diffusers import UNet2DConditionModel

    def unet():
        return UNet2DConditionModel(
            block_out_channels=(32, 64),
            layers_per_block=1,
            cross_attention_dim=32,
            norm_num_groups=32,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            sample_size=8,
        )

    cfg = _cfg(gradient_checkpointing=setting, max_steps=1)
    with Session(cfg, stage, tmp_path / "out") as session:
        assert session.checkpointing.enabled is enabled
        assert session.place(unet()).is_gradient_checkpointing is enabled
        model = session.trainable_unet(unet())
        assert model.is_gradient_checkpointing is enabled
        session.start({"m": model}, list(model.parameters()), validate=False, desc="t")
        for _ in session.steps():
            pass
        session.finish("test", lambda out: [])
    extra = json.loads((tmp_path / "out" / "train_summary.json").read_text())["extra"]
    assert extra["gradient_checkpointing"] is enabled
    reason = "set in the config" if setting != "auto" else "auto: no GPU"
    assert extra["gradient_checkpointing_reason"].startswith(reason)
