"""GPU benchmark of the LoRA step at real sizes: SD 1.5 UNet at 512 px and SDXL UNet at 1024 px.

    python -m sdtune.bench.gpu --out DIR [--quick] [--budget-s S]   # on a CUDA machine (H100/H200/A100 …)
    python -m sdtune.bench.gpu --out DIR --cpu-tiny                  # a tiny UNet on the CPU: keeps the script alive

What one step is (the trainer's recipe on a GPU): the UNet from its real config with random weights (no
download), frozen and cast to bf16; a peft LoRA (rank 4 on to_q/to_k/to_v/to_out.0, like the trainer's
defaults) trained in fp32 under bf16 autocast; SDPA attention (diffusers' default processor); cached inputs:
random latents of the right shape and random text embeddings (the VAE and text encoders are out of the loop,
as in the trainer); noise, timesteps and ``add_noise`` on the device; MSE loss; backward; fused AdamW; no host
sync inside the timed steps (CUDA events around them).

Variants: ``torch.compile`` on/off, channels_last on/off, and a batch sweep at 512 px for MFU at a batch
that fills the chip. For each: steps/s (median of timed windows), peak GPU memory, FLOPs per step
(``torch.utils.flop_counter.FlopCounterMode`` over one eager step), MFU = FLOPs/step × steps/s / peak, where
the peak is the detected GPU's dense bf16 rate (H100 SXM and H200: 989 TFLOP/s), and the time 1,000 steps
would take. Results go to ``DIR/gpu_bench.json`` and ``DIR/gpu_bench.md`` after every case, so a run cut
short still leaves what it measured; ``--budget-s`` skips cases that would not fit.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

# The real UNet configs (diffusers' unet/config.json of runwayml/stable-diffusion-v1-5 and
# stabilityai/stable-diffusion-xl-base-1.0), written out (no hub access needed) where they differ from
# diffusers' defaults: the script stays standalone (torch, diffusers and peft only).
SD15_UNET = {
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "layers_per_block": 2,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "layers_per_block": 2,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
# A tiny UNet (the project's tiny SD 1.5) for --cpu-tiny.
TINY_UNET = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "sample_size": 32,
    "in_channels": 4,
    "out_channels": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "cross_attention_dim": 32,
    "norm_num_groups": 32,
}
MODELS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET}
# Dense bf16 tensor-core peaks (datasheets, without sparsity), by a substring of the device name.
PEAK_BF16 = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12), ("L40S", 362e12)]


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    for key, value in PEAK_BF16:
        if key in name:
            return name, value
    return name, None


class Case:
    def __init__(self, model: str, res: int, batch: int, compile: bool, channels_last: bool):
        self.model, self.res, self.batch, self.compile, self.channels_last = (
            model,
            res,
            batch,
            compile,
            channels_last,
        )

    @property
    def name(self) -> str:
        opts = ["compile" if self.compile else "eager"] + (["channels_last"] if self.channels_last else [])
        return f"{self.model} {self.res}px b{self.batch} {'+'.join(opts)}"


def build_unet(model: str, device: torch.device, dtype: torch.dtype, rank: int):
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    with device:  # create the weights on the device: SDXL's 2.6 B parameters initialise in seconds
        unet = UNet2DConditionModel(**MODELS[model])
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    unet.add_adapter(
        LoraConfig(
            r=rank,
            lora_alpha=rank,
            init_lora_weights="gaussian",
            target_modules=["to_q", "to_k", "to_v", "to_out.0"],
        )  # fmt: skip
    )
    params = [p for p in unet.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    unet.train()
    return unet, params


def make_inputs(model: str, res: int, batch: int, device, dtype, sets: int = 3) -> list[dict]:
    """Rotating sets of cached inputs: latents (scaled), text embeddings, SDXL's pooled embeds and time ids."""
    cfg = MODELS[model]
    h = res // 8
    out = []
    for _ in range(sets):
        item = {
            "latents": torch.randn(batch, 4, h, h, device=device, dtype=dtype) * 0.18215,
            "encoder_hidden_states": torch.randn(
                batch, 77, cfg["cross_attention_dim"], device=device, dtype=dtype
            ),
        }
        if cfg.get("addition_embed_type") == "text_time":
            pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
            item["added_cond_kwargs"] = {
                "text_embeds": torch.randn(batch, pooled, device=device, dtype=dtype),
                "time_ids": torch.tensor([[res, res, 0, 0, res, res]], device=device, dtype=dtype).repeat(
                    batch, 1
                ),
            }
        out.append(item)
    return out


def make_step(unet, params, device, amp_dtype):
    from diffusers import DDPMScheduler

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    fused = device.type == "cuda"
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-2, fused=fused)
    use_amp = amp_dtype != torch.float32

    def step(inputs: dict) -> torch.Tensor:
        latents = inputs["latents"]
        noise = torch.randn_like(latents)
        t = torch.randint(0, 1000, (latents.shape[0],), device=device)
        noisy = scheduler.add_noise(latents, noise, t)
        extra = {"added_cond_kwargs": inputs["added_cond_kwargs"]} if "added_cond_kwargs" in inputs else {}
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            pred = unet(noisy, t, inputs["encoder_hidden_states"], return_dict=False, **extra)[0]
        loss = torch.nn.functional.mse_loss(pred.float(), noise.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=fused or None)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach()

    return step


def count_flops(step, inputs) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step(inputs)
    return float(counter.get_total_flops())


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, inputs: list[dict], device, steps: int, windows: int) -> list[float]:
    """Seconds per step for each window (CUDA events on GPU, no host sync inside a window)."""
    out = []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for i in range(steps):
                step(inputs[i % len(inputs)])
            end.record()
            end.synchronize()
            out.append(start.elapsed_time(end) / 1000 / steps)
        else:
            t0 = time.perf_counter()
            for i in range(steps):
                step(inputs[i % len(inputs)])
            out.append((time.perf_counter() - t0) / steps)
    return out


def run_case(
    case: Case, device, dtype, rank: int, warmup: int, steps: int, windows: int, flops_cache: dict
) -> dict:
    unet, params = build_unet(case.model, device, dtype, rank)
    if case.channels_last:
        unet.to(memory_format=torch.channels_last)
    inputs = make_inputs(case.model, case.res, case.batch, device, dtype)
    if case.channels_last:
        for item in inputs:
            item["latents"] = item["latents"].contiguous(memory_format=torch.channels_last)
    amp = dtype if device.type == "cuda" else torch.float32
    key = (case.model, case.res, case.batch)
    if key not in flops_cache:  # FLOPs of the math, counted once per shape on the eager model
        flops_cache[key] = count_flops(make_step(unet, params, device, amp), inputs[0])
    if case.compile:
        unet = torch.compile(unet)
    step = make_step(unet, params, device, amp)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    loss = None
    for i in range(warmup):
        loss = step(inputs[i % len(inputs)])
    _sync(device)
    warmup_s = time.perf_counter() - t0
    per_step = time_steps(step, inputs, device, steps, windows)
    loss = float(step(inputs[0]))
    sec = statistics.median(per_step)
    row = {
        "case": case.name,
        "model": case.model,
        "resolution": case.res,
        "batch": case.batch,
        "compile": case.compile,
        "channels_last": case.channels_last,
        "steps_per_sec": 1 / sec,
        "images_per_sec": case.batch / sec,
        "step_ms": sec * 1000,
        "step_ms_min_max": [min(per_step) * 1000, max(per_step) * 1000],
        "warmup_s": warmup_s,
        "flops_per_step": flops_cache[key],
        "minutes_per_1000_steps": 1000 * sec / 60,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss,
        "lora_params": sum(p.numel() for p in params),
    }
    del unet, params, step, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return row


def plan(args) -> list[Case]:
    if args.cpu_tiny:
        return [
            Case("tiny", 64, 1, False, False),
            Case("tiny", 64, 1, False, True),
            Case("tiny", 64, 2, False, False),
        ]
    cases = [  # most wanted first: a run cut short by --budget-s keeps these
        Case("sd15", 512, 1, False, False),
        Case("sdxl", 1024, 1, False, False),
        Case("sd15", 512, 16, False, False),
        Case("sd15", 512, 1, False, True),
        Case("sdxl", 1024, 1, False, True),
        Case("sd15", 512, 4, False, False),
        Case("sd15", 512, 8, False, False),
        Case("sd15", 512, 1, True, False),
        Case("sd15", 512, 16, True, False),
        Case("sdxl", 1024, 1, True, False),
    ]
    if not args.quick:
        cases += [
            Case("sd15", 512, 1, True, True),
            Case("sdxl", 1024, 4, False, False),
            Case("sd15", 512, 32, False, False),
        ]
    return cases


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = meta["peak_bf16_flops"]
    lines = [
        f"GPU: {meta['device']}; peak used for MFU: "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "none (unknown device)")
        + f"; torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}; {meta['date']}; `{meta['command']}`",
        "",
        "| case | steps/s | images/s | ms/step | peak mem GiB | TFLOP/step | MFU | 1,000 steps |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | error: {r['error'][:80]} | | | | | | |")
            continue
        mem = f"{r['peak_mem_gib']:.1f}" if r["peak_mem_gib"] is not None else "-"
        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['steps_per_sec']:.2f} | {r['images_per_sec']:.1f} | {r['step_ms']:.1f} | {mem} | "
            f"{r['flops_per_step'] / 1e12:.3f} | {mfu} | {r['minutes_per_1000_steps']:.1f} min |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="fewer timed steps and no extra cases")
    p.add_argument("--cpu-tiny", action="store_true", help="tiny UNet on the CPU, fp32 (a smoke test)")
    p.add_argument(
        "--budget-s", type=float, default=None, help="skip the remaining cases after this many seconds"
    )
    p.add_argument("--rank", type=int, default=4)
    args = p.parse_args(argv)

    import diffusers
    import peft

    started = time.perf_counter()
    if args.cpu_tiny:
        device, dtype = torch.device("cpu"), torch.float32
        warmup, steps, windows = 1, 2, 2
    else:
        if not torch.cuda.is_available():
            p.error("no CUDA device: use --cpu-tiny on a CPU")
        device, dtype = torch.device("cuda"), torch.bfloat16
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        warmup, steps, windows = (3, 10, 3) if args.quick else (5, 20, 5)
    name, peak = peak_flops(device)
    meta = {
        "device": name,
        "peak_bf16_flops": peak,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "diffusers": diffusers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python -m sdtune.bench.gpu " + " ".join(argv if argv is not None else sys.argv[1:]),
        "lora_rank": args.rank,
        "timing": f"{warmup} warm-up steps, then {windows} windows of {steps} steps; median",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    flops_cache: dict = {}
    for case in plan(args):
        elapsed = time.perf_counter() - started
        need = (150 if case.model == "sdxl" else 90) if case.compile else 0  # compile time, roughly
        if args.budget_s is not None and elapsed + need > args.budget_s:
            rows.append({"case": case.name, "error": f"skipped: budget of {args.budget_s:.0f} s spent"})
            continue
        print(f"[gpu-bench] {case.name} (t={elapsed:.0f} s) …", flush=True)
        try:
            row = run_case(case, device, dtype, args.rank, warmup, steps, windows, flops_cache)
        except (
            Exception
        ) as exc:  # keep going: one failing variant (an OOM, a compile error) must not lose the rest
            row = {
                "case": case.name,
                "error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}",
            }
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if "error" not in row:
            row["mfu"] = row["flops_per_step"] * row["steps_per_sec"] / peak if peak else None
            print(
                f"    {row['steps_per_sec']:.2f} steps/s, {row['step_ms']:.1f} ms/step, "
                f"{row['flops_per_step'] / 1e12:.3f} TFLOP/step, MFU {row['mfu'] or 0:.1%}, "
                f"peak {row['peak_mem_gib'] or 0:.1f} GiB, warm-up {row['warmup_s']:.1f} s",
                flush=True,
            )
        else:
            print(f"    {row['error']}", flush=True)
        rows.append(row)
        (args.out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
        (args.out / "gpu_bench.md").write_text(markdown(meta, rows) + "\n")
    meta["total_s"] = time.perf_counter() - started
    (args.out / "gpu_bench.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    print()
    print(markdown(meta, rows))
    return 0 if any("error" not in r for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
