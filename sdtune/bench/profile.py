"""Where a LoRA step's time goes on the CPU: ``python -m sdtune.bench.profile [--setup tiny|medium]``.

1. Phases of the reference step, each timed on its own (the CPU runs synchronously, so wall time per phase
   is exact): VAE encode, text encode, UNet forward, backward, grad clip, optimizer, ``loss.item()``.
   Everything but the UNet forward/backward and the optimizer is what the trainer's caching removes, so
   ``reference step / (reference step − removed phases)`` bounds the speed-up caching can give.
2. The same optimizer phase with AdamW ``foreach=True`` and ``fused=True`` (same math, fewer dispatches).
3. ``torch.profiler`` over 10 steps of the real trainer (:func:`sdtune.train.lora.train`, its logger
   stepping the profiler every step): the top operators by self CPU time.

Threads pinned like the benchmark (``OMP_NUM_THREADS``, default 1).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path


def _timed(sink: list[float], fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    sink.append(time.perf_counter() - t0)
    return out


def phase_breakdown(ref, steps: int) -> dict[str, float]:
    """Median ms per phase over ``steps`` reference steps (same math as ReferenceLoRA.step, split up)."""
    import torch
    import torch.nn.functional as F

    phases: dict[str, list[float]] = {
        k: [] for k in ("vae_encode", "text_encode", "unet_forward", "backward", "clip", "optimizer", "item")
    }
    gen, sched = ref.generator, ref.noise_scheduler
    for _ in range(steps):
        idx = ref._next_batch()
        latents = _timed(phases["vae_encode"], ref.vae.encode, ref.pixels[idx]).latent_dist.sample(
            generator=gen
        )
        latents = latents * ref.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen)
        t = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), generator=gen)
        noisy = sched.add_noise(latents, noise, t)
        ehs = _timed(phases["text_encode"], ref.text_encoder, ref.input_ids[idx])[0]
        pred = _timed(phases["unet_forward"], ref.unet, noisy, t, ehs).sample
        loss = F.mse_loss(pred.float(), noise.float())
        _timed(phases["backward"], loss.backward)
        _timed(phases["clip"], torch.nn.utils.clip_grad_norm_, ref.params, 1.0)
        _timed(phases["optimizer"], ref.optimizer.step)
        ref.optimizer.zero_grad(set_to_none=True)
        _timed(phases["item"], loss.item)
    return {k: round(1000 * statistics.median(v[1:] or v), 2) for k, v in phases.items()}


def optimizer_variants(ref, repeats: int = 30) -> dict[str, float]:
    """ms per AdamW step over the LoRA parameters (gradients filled with noise): default vs foreach vs fused."""
    import torch

    out = {}
    for name, kw in (("default", {}), ("foreach", {"foreach": True}), ("fused", {"fused": True})):
        params = [p.detach().clone().requires_grad_(True) for p in ref.params]
        for p in params:
            p.grad = torch.randn_like(p)
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=1e-2, **kw)
        times: list[float] = []
        for _ in range(repeats):
            _timed(times, opt.step)
        out[name] = round(1000 * statistics.median(times[3:]), 3)
    out["tensors"] = len(ref.params)
    return out


def trainer_profile(cfg_path: Path, data: Path, out: Path, rows: int) -> str:
    import torch
    from torch.profiler import ProfilerActivity, profile, schedule

    from sdtune.config import load_config
    from sdtune.train.lora import train

    cfg = load_config(cfg_path, ["train.max_steps=18", "train.log_every=1"])
    with profile(activities=[ProfilerActivity.CPU], schedule=schedule(wait=6, warmup=2, active=10)) as prof:

        class Stepper:
            def log(self, metrics, step):
                prof.step()

            def close(self):
                pass

        train(cfg, data, out, logger=Stepper())
    del torch
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--setup", default="tiny", choices=["tiny", "medium"])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--rows", type=int, default=20)
    args = p.parse_args(argv)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    from sdtune.bench.reference import ReferenceLoRA
    from sdtune.bench.setups import SETUPS, build_model, make_stage, write_config
    from sdtune.config import load_config

    setup = SETUPS[args.setup]
    with tempfile.TemporaryDirectory(prefix="sdtune-profile-") as tmp:
        root = Path(tmp)
        model = build_model(args.setup, root / "model")
        data = make_stage(root / "data", setup.resolution)
        config = write_config(root / "config.yaml", model, setup.resolution)
        ref = ReferenceLoRA.build(load_config(config), data)
        ms = phase_breakdown(ref, args.steps)
        total = sum(ms.values())
        removed = ms["vae_encode"] + ms["text_encode"] + ms["item"]
        print(f"\n## {args.setup}: reference step phases (median ms, {args.steps} steps)")
        for k, v in ms.items():
            print(f"  {k:<13} {v:8.2f} ms  {100 * v / total:5.1f} %")
        print(f"  {'total':<13} {total:8.2f} ms")
        print(
            f"  removed by caching (vae + text + item): {removed:.2f} ms → bound on the speed-up {total / (total - removed):.2f}×"
        )
        print(f"\n## AdamW step over the LoRA tensors (ms): {optimizer_variants(ref)}")
        print(f"\n## {args.setup}: torch.profiler, real trainer, 10 steps, top ops by self CPU time")
        print(trainer_profile(config, data, root / "out", args.rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
