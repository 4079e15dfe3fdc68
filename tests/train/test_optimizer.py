"""The optimizer the session builds: the graph-safe AdamW (device-tensor learning rates, capturable) only for
``train.compile=graphs`` on CUDA, and with it the same training as a float learning rate — step by step
under a warm-up + cosine schedule, and across a checkpoint resume."""

from __future__ import annotations

import io

import pytest
import torch

from sdtune.config import RunConfig
from sdtune.train.runtime import adamw_with_tensor_lr, capturable_step, make_optimizer

STEPS = 10


def _tc(**train):
    cfg = RunConfig()
    for key, value in {"learning_rate": 3e-2, "adam_weight_decay": 1e-2, **train}.items():
        setattr(cfg.train, key, value)
    return cfg.train


@pytest.mark.parametrize(
    "compile_mode, optimizer, devices, expected",
    [
        ("graphs", "adamw", {"cuda"}, True),
        ("graphs", "adamw", {"cpu"}, False),  # the session refuses graphs on a CPU anyway
        ("default", "adamw", {"cuda"}, False),  # a float rate is as fast when nothing captures the step
        ("graphs", "sgd", {"cuda"}, False),
        ("graphs", "adamw", {"cuda", "cpu"}, False),
    ],
)
def test_the_graph_safe_optimizer_only_for_graphs_on_cuda(compile_mode, optimizer, devices, expected):
    assert capturable_step(_tc(compile=compile_mode, optimizer=optimizer), devices) is expected


def test_on_a_cpu_the_optimizer_keeps_a_float_rate_even_when_graphs_is_asked():
    model = torch.nn.Linear(3, 3)
    opt = make_optimizer(_tc(compile="graphs"), model.parameters())
    assert isinstance(opt.param_groups[0]["lr"], float)
    assert opt.defaults["fused"] is True and opt.defaults["capturable"] is False


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.GELU(), torch.nn.Linear(16, 6))


def _groups(model, tc):
    first, second = model[0], model[2]
    return [
        {"params": list(first.parameters())},
        {"params": list(second.parameters()), "lr": tc.learning_rate / 3},
    ]


def _train(opt, model, steps, scheduler, losses, rates):
    torch.manual_seed(1)
    x, y = torch.randn(8, 6), torch.randn(8, 6)
    for _ in range(steps):
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        opt.step()
        scheduler.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        rates.append([float(r) for r in scheduler.get_last_lr()])


def _scheduler(opt):
    from diffusers.optimization import get_scheduler

    return get_scheduler("cosine", opt, num_warmup_steps=3, num_training_steps=STEPS)


def test_a_tensor_learning_rate_trains_exactly_like_a_float_one():
    tc = _tc()
    runs = {}
    for tensor_rate in (False, True):
        model = _model()
        if tensor_rate:  # the graphs optimizer, as built on CUDA, here on the CPU
            opt = adamw_with_tensor_lr(tc, _groups(model, tc), torch.device("cpu"), capturable=True)
            rate_tensors = [g["lr"] for g in opt.param_groups]
        else:
            opt = torch.optim.AdamW(_groups(model, tc), lr=tc.learning_rate, weight_decay=1e-2, fused=True)
        losses, rates = [], []
        _train(opt, model, STEPS, _scheduler(opt), losses, rates)
        runs[tensor_rate] = (losses, rates, [p.detach().clone() for p in model.parameters()])
    # The loss curve, to fp32 round-off: the tensor rate is fp32, the float one a double (6e-8 apart at step 9).
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-6, abs=0)
    flat = {k: [r for step in v[1] for r in step] for k, v in runs.items()}
    assert flat[True] == pytest.approx(flat[False], rel=1e-6)  # the schedule (fp32 tensor vs double)
    assert len({r[0] for r in runs[True][1]}) > 5  # the schedule did move the rate
    assert all(
        torch.allclose(a, b, rtol=1e-5, atol=1e-7) for a, b in zip(runs[True][2], runs[False][2], strict=True)
    )
    # The schedule wrote into the tensors the optimizer was built with (what a captured graph reads).
    assert [g["lr"] for g in opt.param_groups] == rate_tensors
    assert all(a is b for a, b in zip((g["lr"] for g in opt.param_groups), rate_tensors, strict=True))
    assert float(rate_tensors[0]) == pytest.approx(runs[False][1][-1][0], abs=1e-9)


def test_a_resumed_tensor_rate_is_copied_into_the_same_tensors():
    tc = _tc()
    straight, _ = [], []
    model = _model()
    opt = adamw_with_tensor_lr(tc, _groups(model, tc), torch.device("cpu"), capturable=True)
    _train(opt, model, STEPS, _scheduler(opt), straight, _)

    first, rates = [], []
    model = _model()
    opt = adamw_with_tensor_lr(tc, _groups(model, tc), torch.device("cpu"), capturable=True)
    scheduler = _scheduler(opt)
    _train(opt, model, STEPS // 2, scheduler, first, rates)
    buffer = io.BytesIO()
    torch.save(
        {"model": model.state_dict(), "opt": opt.state_dict(), "sched": scheduler.state_dict()}, buffer
    )
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)

    model = _model()
    opt = adamw_with_tensor_lr(tc, _groups(model, tc), torch.device("cpu"), capturable=True)
    before = [g["lr"] for g in opt.param_groups]
    scheduler = _scheduler(opt)
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    scheduler.load_state_dict(saved["sched"])
    after = [g["lr"] for g in opt.param_groups]
    assert all(a is b for a, b in zip(after, before, strict=True))  # the tensors a graph would hold
    assert [float(r) for r in after] == pytest.approx(rates[-1], rel=1e-6)  # … now at the saved rates
    rest = []
    _train(opt, model, STEPS - STEPS // 2, scheduler, rest, [])
    # Same data every step (the inputs are re-drawn from the same seed), so the curves line up step by step.
    assert first + rest == pytest.approx(straight, rel=1e-6)
