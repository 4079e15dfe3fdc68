"""The dtype casts of a LoRA step over a half-precision base: ``python -m sdtune.bench.casts [--steps 20]``.

A LoRA over a bf16 base trains in one of three ways here, each on the same tiny UNet (random weights, bf16),
the same rank-4 LoRA init, the same data and noise, under bf16 autocast (as the trainer runs on a GPU):

- ``fp32 LoRA, peft casts`` — fp32 adapter weights, peft's own input cast on: every adapted layer casts its
  bf16 input to fp32, which autocast casts straight back to bf16 for the matmul (and both again in backward).
- ``fp32 LoRA, no input cast`` — the same weights with peft's input cast off (``cast_input_dtype_enabled``):
  the bf16 input goes to the matmul as it is; autocast casts each fp32 adapter weight to bf16 once per step
  (its cast cache). What the trainer does (:func:`sdtune.train.adapters.add_lora`).
- ``bf16 LoRA + fp32 master`` — bf16 adapter weights (no cast in the forward at all) and fp32 master copies
  in the optimizer: each step casts the bf16 gradients up and the updated masters down.

It reports, per step, the cast operators (``aten::_to_copy``: each one a kernel on a GPU) and all operators
counted by ``torch.profiler``, and each way's loss curve against the first. Threads pinned
(``OMP_NUM_THREADS``, default 1). bf16 on a CPU without bf16 instructions is slow (~20× fp32): this counts,
it does not time.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

WAYS = ("fp32 LoRA, peft casts", "fp32 LoRA, no input cast", "bf16 LoRA + fp32 master")
TINY_UNET = {
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "UpBlock2D"),
    "sample_size": 16,
}


def _unet(way: str):
    from diffusers import UNet2DConditionModel

    from sdtune.config import RunConfig
    from sdtune.train.adapters import add_lora, set_input_casting, to_fp32

    torch.manual_seed(0)
    unet = UNet2DConditionModel(**TINY_UNET).to(torch.bfloat16)
    unet.requires_grad_(False)
    tc = RunConfig.model_validate({"train": {"rank": 4}}).train
    params = add_lora(unet, tc, tc.target_modules)  # input cast off, as the trainer runs it
    if way == WAYS[0]:
        set_input_casting(unet, True)
    if way != WAYS[2]:
        to_fp32(params)
    return unet, params


class MasterAdamW:
    """AdamW on fp32 copies of bf16 weights: gradients cast up, the updated weights cast back down."""

    def __init__(self, params, lr: float):
        self.params = list(params)
        self.master = [p.detach().float().requires_grad_(True) for p in self.params]
        self.inner = torch.optim.AdamW(self.master, lr=lr, weight_decay=1e-2, fused=True)

    def step(self) -> None:
        for m, p in zip(self.master, self.params, strict=True):
            m.grad = p.grad.float()
        self.inner.step()
        with torch.no_grad():
            torch._foreach_copy_(self.params, self.master)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None
        self.inner.zero_grad(set_to_none=set_to_none)


def run(way: str, steps: int, lr: float = 3e-3) -> dict:
    """``steps`` training steps of ``way``: the loss per step and the profiler's counts for one steady step."""
    import torch.nn.functional as F
    from torch.profiler import ProfilerActivity, profile

    unet, params = _unet(way)
    if way == WAYS[2]:
        optimizer = MasterAdamW(params, lr)
    else:
        optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2, fused=True)
    data = torch.Generator().manual_seed(1)
    latents = torch.randn(2, 4, 16, 16, generator=data)
    context = torch.randn(2, 77, 32, generator=data)
    losses, counts = [], {}
    for step in range(steps):
        noise = torch.randn(latents.shape, generator=data)
        t = torch.randint(0, 1000, (2,), generator=data)
        noisy = latents + noise * (t.float() / 1000).view(-1, 1, 1, 1)
        recorder = profile(activities=[ProfilerActivity.CPU]) if step == 2 else None
        with recorder or _nothing():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                pred = unet(noisy.bfloat16(), t, encoder_hidden_states=context.bfloat16()).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if recorder is not None:
            names = [e.name for e in recorder.events()]
            counts = {
                "casts": names.count("aten::_to_copy"),
                "to_calls": names.count("aten::to"),
                "operators": sum(n.startswith("aten::") for n in names),
            }
    return {"losses": losses, **counts}


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.bench.casts", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    results = {way: run(way, args.steps) for way in WAYS}
    base = results[WAYS[0]]["losses"]
    print(f"{'way':<28}{'casts/step':>11}{'aten ops/step':>15}{'max |Δloss| vs first':>23}{'final loss':>12}")
    for way, r in results.items():
        diff = max(abs(a - b) for a, b in zip(r["losses"], base, strict=True))
        r["max_abs_loss_diff"] = diff
        print(f"{way:<28}{r['casts']:>11}{r['operators']:>15}{diff:>23.3g}{r['losses'][-1]:>12.5f}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
