"""GPU benchmark of the training step at real sizes: SD 1.5 LoRA at 512 px and the seed job (SDXL pivotal).

    python -m sdtune.bench.gpu --out DIR [--quick] [--budget-s S] [--only NAMES]   # on a CUDA machine
    python -m sdtune.bench.gpu --out DIR --cpu-tiny                                 # rehearsal on the CPU (< 2 min)

Cases, most wanted first (a run cut short by ``--budget-s`` keeps the first ones):

1. SD 1.5 512 px batch 1 LoRA rank 4, eager (a minute's calibration against the earlier H100 run);
2. the seed job (``configs/sdxl/seed_job.yaml``: SDXL 768 px batch 4, LoRA rank 32 + 2 new tokens in both
   text encoders) in its embedding phase (text encoders run with gradients, only the new rows train), eager
   and graphed (``graphs``): the ≤ 240 ms/step goal;
3. SD 1.5 b1 graphed, the seed job's LoRA-only phase (text encoders without gradients) graphed, SD 1.5 b1
   compiled (``train.compile=default``), the LoRA-only phase eager;
4. batch sweeps graphed: SD 1.5 512 px b16, SDXL 768 px b8 (LoRA) — MFU at a batch that fills the chip.

``--budget-s``: a case starts only when its expected time (:func:`expected_seconds`: compile included)
fits in what is left, and an alarm stops the case running when the budget ends, so the process exits, with
every finished case written, before whoever runs it kills it.

What one step is (the trainer's, built from the project's own pieces): the UNet from its real config with
random weights (no download), frozen in bf16, peft LoRA (``sdtune.train.adapters.add_lora``) in fp32 under
bf16 autocast; SDXL's text encoders (real CLIP-L/CLIP-G configs, fp32) with the concept rows as their own
parameter (:class:`sdtune.train.embeddings.ConceptEmbedding`); cached latents; noise and timesteps drawn on the
device; min-SNR loss; backward; gradient clipping; fused AdamW (graphed cases: capturable, device-tensor LR); the UNet
(and the seed job's text encoders) compiled by :func:`sdtune.train.compile.compile_in_place`. No host sync inside
the timed steps.

Per case: ms/step (CUDA events; median of windows), **host enqueue ms/step** (wall time for the host to
issue the steps before it waits: close to ms/step means host-bound) beside the host floor ``sdtune plan``
predicts (:func:`planned_host`), FLOPs/step
(``torch.utils.flop_counter.FlopCounterMode``, one eager step) and MFU against the card's dense bf16 peak,
peak memory, **kernel launches per step** (``torch.profiler``: ``cudaLaunchKernel``-family and
``cudaGraphLaunch`` calls), **syncs per step** (``torch.cuda.set_sync_debug_mode("warn")`` warnings), the top
self-CPU operators, compile/warm-up time and minutes per 1,000 steps. Results go to ``DIR/gpu_bench.json`` and
``DIR/gpu_bench.md`` after every case. ``--cpu-tiny``: the same cases on the tiny models at 64 px on the CPU
(fp32; the compiled cases with the ``aot_eager`` backend, the graphed ones recorded as CUDA-only), so the
script is known to run before GPU time is spent on it.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

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
# Tiny UNets (the project's tiny SD 1.5 and SDXL shapes) for --cpu-tiny.
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
TINY_SDXL_UNET = {
    **TINY_UNET,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "attention_head_dim": [2, 4],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 80,  # 6 × 8 (size/crop ids) + 32 (pooled projection)
    "cross_attention_dim": 64,  # the two encoders' hidden states side by side
}
MODELS = {"sd15": SD15_UNET, "sdxl": SDXL_UNET, "tiny": TINY_UNET, "tiny-sdxl": TINY_SDXL_UNET}
# SDXL's text encoders (CLIP ViT-L/14 and OpenCLIP ViT-bigG/14 text towers, their transformers configs).
SDXL_TEXT = [
    {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
     "hidden_act": "quick_gelu", "projection_dim": 768},
    {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
     "hidden_act": "gelu", "projection_dim": 1280},
]  # fmt: skip
TINY_TEXT = [
    {"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2, "num_attention_heads": 4,
     "hidden_act": "quick_gelu", "projection_dim": 32},
] * 2  # fmt: skip
VOCAB = 49408
# Dense bf16 tensor-core peaks (datasheets, without sparsity), by a substring of the device name.
PEAK_BF16 = [
    ("H200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12), ("H100", 989e12), ("A100", 312e12),
    ("L40S", 362e12),
]  # fmt: skip


def peak_flops(device: torch.device) -> tuple[str, float | None]:
    if device.type != "cuda":
        return "cpu", None
    name = torch.cuda.get_device_name(device)
    if "MIG" in name:  # a slice of the chip: the whole chip's peak would understate the MFU
        return name, None
    for key, value in PEAK_BF16:
        if key in name:
            return name, value
    return name, None


@dataclass(frozen=True)
class Case:
    model: str  # key of MODELS
    res: int
    batch: int
    mode: str = "eager"  # eager | compile | graphs  (train.compile none | default | graphs)
    recipe: str = "lora"  # lora | pivotal-te (embedding phase) | pivotal-frozen (LoRA-only phase)
    rank: int = 4
    channels_last: bool = False

    @property
    def name(self) -> str:
        label = {"sdxl": "seed job" if self.recipe != "lora" else "sdxl", "tiny-sdxl": "tiny seed job"}
        model = label.get(self.model, self.model) if self.recipe != "lora" else self.model
        extra = "+channels_last" if self.channels_last else ""
        return f"{model} {self.res}px b{self.batch} {self.recipe} r{self.rank} {self.mode}{extra}"

    @property
    def compile_mode(self) -> str:
        return {"eager": "none", "compile": "default", "graphs": "graphs"}[self.mode]


def _tc(rank: int, compile_mode: str = "none"):
    """The trainer's settings for a case (``compile_mode``: graphs makes the optimizer graph-safe)."""
    from sdtune.config import RunConfig

    train = {"rank": rank, "snr_gamma": 5.0, "compile": compile_mode}
    return RunConfig.model_validate({"train": train}).train


def build_unet(model: str, device: torch.device, dtype: torch.dtype, rank: int):
    """The UNet of ``model`` with random weights, frozen in ``dtype``, under the trainer's LoRA (fp32)."""
    from diffusers import UNet2DConditionModel

    from sdtune.train.adapters import add_lora, to_fp32

    torch.manual_seed(0)
    with device:  # create the weights on the device: SDXL's 2.6 B parameters initialise in seconds
        unet = UNet2DConditionModel(**MODELS[model])
    unet.requires_grad_(False)
    if dtype != torch.float32:
        unet.to(dtype)
    tc = _tc(rank)
    params = add_lora(unet, tc, tc.target_modules)
    to_fp32(params)
    unet.train()
    return unet, params


def build_text_encoders(model: str, device: torch.device):
    """SDXL's two text encoders (fp32, as pivotal keeps them), random weights, with 2 concept tokens added
    at the end of the vocabulary as their own trainable rows. Returns (encoders, concept rows, token ids)."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdtune.train.embeddings import concept_embedding

    configs = TINY_TEXT if model.startswith("tiny") else SDXL_TEXT
    encoders, rows = [], []
    new_ids = torch.tensor([VOCAB, VOCAB + 1])
    for i, extra in enumerate(configs):
        config = CLIPTextConfig(
            vocab_size=VOCAB + 2, max_position_embeddings=77, eos_token_id=VOCAB - 1, **extra
        )
        torch.manual_seed(10 + i)
        with device:
            encoder = (CLIPTextModel if i == 0 else CLIPTextModelWithProjection)(config)
        embedding = concept_embedding(encoder, new_ids)
        encoder.train()
        encoders.append(encoder)
        rows.append(embedding.rows)
    return encoders, rows, new_ids


def planned_host(case: Case, cache: dict) -> dict:
    """What ``sdtune plan`` predicts for the case's host floor (:mod:`sdtune.train.plan`: the kernels it
    counts in a meta forward of the UNet, and of the text encoders where they run, × ``HOST_S_PER_KERNEL``
    under the case's compile mode), to set beside the measured host enqueue time: every GPU run checks the
    planner's calibration, and recalibrates it (``HOST_S_PER_KERNEL`` = measured seconds / kernels)."""
    from sdtune.config import RunConfig
    from sdtune.train import plan as P

    key = (case.model, case.recipe)
    if key not in cache:  # the count depends on neither the batch nor the resolution nor the rank
        texts = TINY_TEXT if case.model.startswith("tiny") else SDXL_TEXT
        encoder_dim = sum(c["hidden_size"] for c in texts) if "sdxl" in case.model else None
        lora = RunConfig.model_validate({"train": {"rank": case.rank}})
        prof = P.profile_forward(MODELS[case.model], case.res, 1, encoder_dim, lora=lora)
        passes = {"pivotal-te": 2.0, "pivotal-frozen": 1.0}.get(case.recipe, 0.0)
        configs = [{**c, "vocab_size": VOCAB + 2, "max_position_embeddings": 77} for c in texts]
        encoders = sum(P.encoder_kernels(c) for c in configs) if passes else 0
        cache[key] = (prof, encoders, passes)
    prof, encoders, passes = cache[key]
    host = P.host_seconds(prof, case.compile_mode, 2.0)
    host += P.text_encoder_kernel_seconds(encoders, passes, case.compile_mode)
    return {"planned_forward_kernels": prof.kernels, "planned_host_ms": host * 1000}


def make_inputs(case: Case, device, dtype, sets: int = 3) -> list[dict]:
    """Rotating sets of cached inputs: latents (scaled), and text embeddings (LoRA) or token ids with the
    concept tokens in them (pivotal)."""
    cfg = MODELS[case.model]
    h = case.res // 8
    g = torch.Generator(device="cpu").manual_seed(0)
    out = []
    for _ in range(sets):
        item = {"latents": (torch.randn(case.batch, 4, h, h, generator=g) * 0.13).to(device, dtype)}
        if case.recipe == "lora":
            item["encoder_hidden_states"] = torch.randn(
                case.batch, 77, cfg["cross_attention_dim"], generator=g
            )
            item["encoder_hidden_states"] = item["encoder_hidden_states"].to(device, dtype)
            if cfg.get("addition_embed_type") == "text_time":
                pooled = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
                item["text_embeds"] = torch.randn(case.batch, pooled, generator=g).to(device, dtype)
        else:
            ids = torch.randint(0, VOCAB - 2, (case.batch, 77), generator=g)
            ids[:, 0], ids[:, 1:3], ids[:, 12] = VOCAB - 2, torch.tensor([VOCAB, VOCAB + 1]), VOCAB - 1
            item["ids"] = ids.to(device)
        if case.channels_last:
            item["latents"] = item["latents"].contiguous(memory_format=torch.channels_last)
        out.append(item)
    return out


def make_step(case: Case, unet, params, device, amp_dtype, encoders=(), rows=()):
    """One training step of ``case`` as the trainer runs it; returns the loss (on the device)."""
    from diffusers import DDPMScheduler

    from sdtune.train import compile as K
    from sdtune.train import data as D
    from sdtune.train import losses as L
    from sdtune.train.runtime import make_optimizer

    scheduler = DDPMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000
    )
    scheduler.alphas_cumprod = scheduler.alphas_cumprod.to(device)
    tc = _tc(case.rank, case.compile_mode)
    objective = L.Denoising(scheduler, tc)
    train_rows = case.recipe == "pivotal-te"
    groups = [{"params": list(params), "lr": 1e-4}] + (
        [{"params": list(rows), "lr": 1e-3}] if train_rows else []
    )
    optimizer = make_optimizer(tc, groups)
    trained = [p for g in groups for p in g["params"]]
    use_amp = amp_dtype != torch.float32
    parts = (
        SimpleNamespace(is_sdxl=True, is_sd3=False, text_encoder=encoders[0], text_encoder_2=encoders[1])
        if encoders
        else None
    )
    size = D.size_ids(case.res, device)
    generator = torch.Generator(device=device).manual_seed(0)

    def step(inputs: dict) -> torch.Tensor:
        K.begin_step(case.compile_mode)
        latents = inputs["latents"]
        noisy, t, target = objective.add_noise(latents, generator)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            if parts is not None:
                with torch.set_grad_enabled(train_rows):
                    text = D.text_conditioning(
                        parts, {"ids": inputs["ids"], "ids_2": inputs["ids"]}, case.res
                    )
                cond = D.unet_kwargs(text, latents.dtype)
            else:
                cond = {"encoder_hidden_states": inputs["encoder_hidden_states"]}
                if "text_embeds" in inputs:
                    time_ids = size.to(latents.dtype).repeat(latents.shape[0], 1)
                    cond["added_cond_kwargs"] = {"text_embeds": inputs["text_embeds"], "time_ids": time_ids}
            pred = unet(noisy, t, return_dict=False, **cond)[0]
        loss = objective.loss(pred, target, t).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trained, 1.0, foreach=device.type == "cuda" or None)
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


def time_steps(step, inputs: list[dict], device, steps: int, windows: int) -> tuple[list[float], list[float]]:
    """(seconds per step, host enqueue seconds per step) for each window: CUDA events on a GPU, no host sync
    inside a window; the enqueue time is the host's wall time to issue the window's steps."""
    per_step, enqueue = [], []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
        t0 = time.perf_counter()
        for i in range(steps):
            step(inputs[i % len(inputs)])
        issued = time.perf_counter() - t0
        if device.type == "cuda":
            end.record()
            end.synchronize()
            per_step.append(start.elapsed_time(end) / 1000 / steps)
        else:
            per_step.append(issued / steps)
        enqueue.append(issued / steps)
    return per_step, enqueue


LAUNCH_CALLS = (
    "cudaLaunchKernel",
    "cudaLaunchKernelExC",
    "cuLaunchKernel",
    "cuLaunchKernelEx",
    "cudaGraphLaunch",
)


GUARD_EVENT = "TorchDynamo Cache Lookup"


def profile_step(step, inputs: list[dict], device, steps: int = 2) -> dict:
    """Kernel launches and host syncs per step, and the top self-CPU operators, over ``steps`` steps."""
    import warnings

    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for i in range(steps):
            step(inputs[i % len(inputs)])
        _sync(device)
    averages = prof.key_averages()
    total_cpu = sum(e.self_cpu_time_total for e in averages) or 1.0
    top = sorted(averages, key=lambda e: e.self_cpu_time_total, reverse=True)[:8]
    out: dict = {
        "top_self_cpu": [
            {
                "op": e.key,
                "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                "share": e.self_cpu_time_total / total_cpu,
                "calls_per_step": e.count / steps,
            }
            for e in top
        ],  # fmt: skip
        "aten_ops_per_step": sum(e.count for e in averages if e.key.startswith("aten::")) / steps,
        # Dynamo's guard evaluation before each compiled call: host time that grows with the number of
        # parameter tensors (each is guarded) and that CUDA graphs do not remove.
        "guard_ms_per_step": sum(e.cpu_time_total for e in averages if e.key == GUARD_EVENT) / 1000 / steps,
        "kernel_launches_per_step": None,
        "gpu_busy_ms_per_step": None,
        "graph_launches_per_step": None,
        "syncs_per_step": None,
    }
    if device.type == "cuda":
        out["kernel_launches_per_step"] = sum(e.count for e in averages if e.key in LAUNCH_CALLS) / steps
        out["graph_launches_per_step"] = sum(e.count for e in averages if e.key == "cudaGraphLaunch") / steps
        out["gpu_busy_ms_per_step"] = gpu_busy_ms(averages, steps)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                for i in range(steps):
                    step(inputs[i % len(inputs)])
            finally:
                torch.cuda.set_sync_debug_mode("default")
        out["syncs_per_step"] = sum("synchroniz" in str(w.message) for w in caught) / steps
        _sync(device)
    return out


def gpu_busy_ms(averages, steps: int) -> float | None:
    """Milliseconds per step the GPU spent in kernels (the profiler's device events). Next to ms/step it tells
    a host-bound step (busy well below it) from a GPU-bound one: both show a host enqueue time near ms/step,
    since launching blocks once the launch queue is full; only host-bound rows calibrate the planner's host
    floor. ``None`` where the profiler records no device time."""
    from torch.autograd import DeviceType

    try:
        busy = sum(e.self_device_time_total for e in averages if e.device_type == DeviceType.CUDA)
    except AttributeError:  # another PyTorch's names: the measurement matters more than this figure
        return None
    return busy / 1000 / steps if busy else None


def run_case(
    case: Case,
    device,
    dtype,
    warmup: int,
    steps: int,
    windows: int,
    flops_cache: dict,
    backend,
    plan_cache: dict | None = None,
) -> dict:
    from sdtune.train.compile import compile_in_place

    unet, params = build_unet(case.model, device, dtype, case.rank)
    encoders, rows = ((), ())
    if case.recipe != "lora":
        encoders, rows, _ = build_text_encoders(case.model, device)
    if case.channels_last:
        unet.to(memory_format=torch.channels_last)
    inputs = make_inputs(case, device, dtype)
    amp = dtype if device.type == "cuda" else torch.float32
    key = (case.model, case.res, case.batch, case.recipe, case.rank)
    if key not in flops_cache:  # FLOPs of the math, counted once per shape on the eager model
        flops_cache[key] = count_flops(make_step(case, unet, params, device, amp, encoders, rows), inputs[0])
    for model in (unet, *encoders):  # as the trainer does: the text encoders run in every step here
        compile_in_place(model, case.compile_mode, backend=backend)
    step = make_step(case, unet, params, device, amp, encoders, rows)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        step(inputs[i % len(inputs)])
    _sync(device)
    warmup_s = time.perf_counter() - t0
    per_step, enqueue = time_steps(step, inputs, device, steps, windows)
    profiled = profile_step(step, inputs, device)
    loss = float(step(inputs[0]))
    sec = statistics.median(per_step)
    row = {
        "case": case.name,
        **{k: getattr(case, k) for k in ("model", "res", "batch", "mode", "recipe", "rank", "channels_last")},
        "steps_per_sec": 1 / sec,
        "images_per_sec": case.batch / sec,
        "step_ms": sec * 1000,
        "step_ms_min_max": [min(per_step) * 1000, max(per_step) * 1000],
        "host_enqueue_ms": statistics.median(enqueue) * 1000,
        "warmup_s": warmup_s,
        "flops_per_step": flops_cache[key],
        "minutes_per_1000_steps": 1000 * sec / 60,
        "peak_mem_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None,
        "loss": loss,
        "trainable_params": sum(p.numel() for p in params)
        + (sum(r.numel() for r in rows) if case.recipe == "pivotal-te" else 0),
        **profiled,
    }
    try:  # a prediction beside the measurement: never worth losing the measurement for
        row.update(planned_host(case, {} if plan_cache is None else plan_cache))
    except Exception as exc:
        row.update(planned_host_ms=None, planned_error=f"{type(exc).__name__}: {exc}"[:200])
    del unet, params, step, inputs, encoders, rows  # freed by _release after every case
    return row


def plan(args) -> list[Case]:
    if args.cpu_tiny:  # the same list at tiny sizes
        sd15, sdxl, res15, resxl, big15, bigxl = "tiny", "tiny-sdxl", 64, 64, 4, 2
    else:
        sd15, sdxl, res15, resxl, big15, bigxl = "sd15", "sdxl", 512, 768, 16, 8
    seed = 4  # the seed job's batch
    cases = [
        Case(sd15, res15, 1, "eager"),
        Case(sdxl, resxl, seed, "eager", "pivotal-te", rank=32),
        Case(sdxl, resxl, seed, "graphs", "pivotal-te", rank=32),
        Case(sd15, res15, 1, "graphs"),
        Case(sdxl, resxl, seed, "graphs", "pivotal-frozen", rank=32),
        Case(sd15, res15, 1, "compile"),
        Case(sdxl, resxl, seed, "eager", "pivotal-frozen", rank=32),
        Case(sd15, res15, big15, "graphs"),
        Case(sdxl, resxl, bigxl, "graphs", rank=32),
    ]
    if args.cpu_tiny:  # rehearse the compiled text encoders too (on a GPU that case costs minutes: below)
        cases.append(Case(sdxl, resxl, seed, "compile", "pivotal-te", rank=32))
    if not args.quick and not args.cpu_tiny:
        cases += [
            Case(sdxl, resxl, seed, "compile", "pivotal-te", rank=32),
            Case(sd15, res15, big15, "eager"),
            Case(sd15, res15, 1, "eager", channels_last=True),
        ]
    if args.only:
        wanted = [w.strip() for w in args.only.split(",") if w.strip()]
        cases = [c for c in cases if any(w in c.name for w in wanted)]
    return cases


def markdown(meta: dict, rows: list[dict]) -> str:
    peak = meta["peak_bf16_flops"]
    lines = [
        f"GPU: {meta['device']}; peak used for MFU: "
        + (f"{peak / 1e12:.0f} TFLOP/s dense bf16" if peak else "none (no GPU or unknown device)")
        + f"; torch {meta['torch']}, diffusers {meta['diffusers']}, peft {meta['peft']}; {meta['date']}; `{meta['command']}`",
        "",
        "| case | ms/step | host enqueue ms/step | planned host floor ms | steps/s | TFLOP/step | MFU "
        "| peak mem GiB | launches/step | syncs/step | warm-up s | 1,000 steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['case']} | {r['error'][:90]} | | | | | | | | | | |")
            continue

        def opt(value, fmt):
            return "-" if value is None else format(value, fmt)

        mfu = f"{100 * r['mfu']:.1f} %" if r.get("mfu") is not None else "-"
        lines.append(
            f"| {r['case']} | {r['step_ms']:.1f} | {r['host_enqueue_ms']:.1f} | "
            f"{opt(r.get('planned_host_ms'), '.1f')} | {r['steps_per_sec']:.2f} | "
            f"{r['flops_per_step'] / 1e12:.3g} | {mfu} | {opt(r['peak_mem_gib'], '.1f')} | "
            f"{opt(r['kernel_launches_per_step'], '.0f')} | {opt(r['syncs_per_step'], '.0f')} | "
            f"{r['warmup_s']:.1f} | {r['minutes_per_1000_steps']:.1f} min |"
        )
    tops = [r for r in rows if "top_self_cpu" in r]
    if tops:
        lines += ["", "Top self-CPU operators per case (ms per step, share of the profiled CPU time):", ""]
        for r in tops:
            ops = ", ".join(
                f"{o['op']} {o['self_cpu_ms_per_step']:.2f} ({o['share']:.0%})" for o in r["top_self_cpu"][:5]
            )
            guards = (
                f"; dynamo guards {r['guard_ms_per_step']:.2f} ms/step" if r.get("guard_ms_per_step") else ""
            )
            lines.append(f"- {r['case']}: {ops}{guards}")
    return "\n".join(lines)


# Seconds a case takes on an H100 beyond its timed steps: building the models and, compiled, the first compile
# (SD 1.5's took 142 s there; SDXL's UNet has 4.4x its transformer blocks, and the seed job compiles both
# text encoders too: not measured, so generous), and each step's seconds eager (measured: SD 1.5 b1 0.17,
# SDXL 1024 px b1 0.49; the seed job planned at 0.59).
SETUP_S = {"eager": 15, "compile": 160, "graphs": 170}
SETUP_S_SDXL = {"eager": 30, "compile": 330, "graphs": 340}
STEP_S = {"sd15": 0.2, "sdxl": 0.6}


def expected_seconds(case: Case, steps: int) -> float:
    """What a case should cost on a GPU (setup and compile, then ``steps`` steps at the eager speed, an upper
    bound for the compiled ones); 0 for the tiny models."""
    if case.model not in STEP_S:
        return 0.0
    setup = (SETUP_S_SDXL if case.model == "sdxl" else SETUP_S)[case.mode]
    return setup + steps * STEP_S[case.model] * max(1.0, case.batch / 4)


class BudgetSpent(Exception):
    pass


def _budget_alarm(seconds: float) -> None:
    """Raise :class:`BudgetSpent` in the running case after ``seconds`` (SIGALRM: Unix main thread only)."""
    import signal

    def stop(signum, frame):
        raise BudgetSpent("stopped: budget spent while this case ran")

    signal.signal(signal.SIGALRM, stop)
    signal.setitimer(signal.ITIMER_REAL, max(seconds, 0.001))


def _budget_alarm_off() -> None:
    import signal

    signal.setitimer(signal.ITIMER_REAL, 0)


def _release(device) -> None:
    """Free what a case left behind before the next one: a compiled module keeps itself alive in a reference
    cycle, and dynamo's caches hold the compiled graphs (and ``graphs``' CUDA-graph pools) until reset; left
    alone, the next case's peak memory would include them."""
    import gc

    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        with contextlib.suppress(RuntimeError):  # a sticky CUDA error: the next case reports it
            torch.cuda.empty_cache()


REQUIRED = (
    "diffusers", "peft", "transformers", "pydantic", "sdtune.config", "sdtune.train.adapters",
    "sdtune.train.compile", "sdtune.train.data", "sdtune.train.embeddings", "sdtune.train.losses",
    "sdtune.train.plan", "sdtune.train.runtime",
)  # fmt: skip


def missing_modules() -> list[str]:
    """The imports a case needs that fail here (each case would fail on the first otherwise, one by one)."""
    import importlib

    missing = []
    for name in REQUIRED:
        try:
            importlib.import_module(name)
        except Exception as exc:  # noqa: BLE001 - any import failure is worth naming
            missing.append(f"{name} ({type(exc).__name__}: {exc})"[:200])
    return missing


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--quick", action="store_true", help="fewer timed steps and no extra cases")
    p.add_argument(
        "--cpu-tiny", action="store_true", help="the cases on tiny models on the CPU (a rehearsal)"
    )
    p.add_argument("--only", default="", help="comma-separated substrings of case names to run")
    p.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="seconds for the whole run: a case starts only if its expected time fits, and is stopped at the end",
    )
    args = p.parse_args(argv)
    missing = missing_modules()
    if missing:
        print("error: cannot import " + "; ".join(missing), file=sys.stderr)
        return 2

    import diffusers
    import peft

    started = time.perf_counter()
    backend = None
    if args.cpu_tiny:
        device, dtype = torch.device("cpu"), torch.float32
        warmup, steps, windows = 1, 2, 2
        backend = "aot_eager"  # the graph capture without inductor's minutes of C++ compilation on a CPU
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
        "timing": f"{warmup} warm-up steps (compilation included), then {windows} windows of {steps} steps; median",
    }
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    flops_cache: dict = {}
    plan_cache: dict = {}
    timed = warmup + steps * windows + 4  # + the profiled and the final steps
    for case in plan(args):
        elapsed = time.perf_counter() - started
        need = expected_seconds(case, timed) if device.type == "cuda" else 0.0
        if args.budget_s is not None and elapsed + need > args.budget_s:
            rows.append(
                {
                    "case": case.name,
                    "error": f"skipped: expected {need:.0f} s, {args.budget_s - elapsed:.0f} s left",
                }
            )
            continue
        if case.mode == "graphs" and device.type != "cuda":
            rows.append({"case": case.name, "error": "skipped: CUDA graphs need a CUDA GPU"})
            continue
        print(f"[gpu-bench] {case.name} (t={elapsed:.0f} s) …", flush=True)
        if args.budget_s is not None:
            _budget_alarm(args.budget_s - elapsed)
        try:
            row = run_case(case, device, dtype, warmup, steps, windows, flops_cache, backend, plan_cache)
        except (
            Exception
        ) as exc:  # keep going: one failing case (an OOM, a compile error) must not lose the rest
            first = str(exc).splitlines()[0] if str(exc) else ""
            row = {"case": case.name, "error": f"{type(exc).__name__}: {first}"}
            row["traceback"] = traceback.format_exc()[-3000:]  # where inductor or the graphs failed
        finally:
            if args.budget_s is not None:
                try:
                    _budget_alarm_off()
                except BudgetSpent:  # it rang between the case's end and here: the case is complete
                    _budget_alarm_off()
        _release(device)
        if "error" not in row:
            row["mfu"] = row["flops_per_step"] * row["steps_per_sec"] / peak if peak else None
            print(
                f"    {row['step_ms']:.1f} ms/step (host {row['host_enqueue_ms']:.1f}, "
                f"planned host floor {row['planned_host_ms'] or 0:.1f}), "
                f"{row['flops_per_step'] / 1e12:.3g} TFLOP/step, MFU {row['mfu'] or 0:.1%}, "
                f"peak {row['peak_mem_gib'] or 0:.1f} GiB, launches {row['kernel_launches_per_step']}, "
                f"syncs {row['syncs_per_step']}, warm-up {row['warmup_s']:.1f} s",
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
