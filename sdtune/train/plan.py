"""The planner: what a training config needs — parameters, memory per GPU, time, cost — before any GPU is
touched (``sdtune plan CONFIG --gpu a100-80gb``).

Nothing here loads weights. The UNet (and text encoders/VAE) are built on ``torch.device("meta")`` from
their configs: the local folder's ``*/config.json``, or for a hub id the real SD 1.5 / SD 2 / SDXL configs
below. One meta forward pass of the UNet at the training resolution then gives, exactly and for free:

- the activation bytes autograd saves for backward (``saved_tensors_hooks`` add up every saved tensor),
  per checkpointable block too (gradient checkpointing keeps block inputs plus one block's internals);
- the forward FLOPs (``FlopCounterMode``).

Memory per GPU = weights + optimizer state (sharded by N under FSDP) + the backward peak of gradients and
activations (they overlap: backward frees each block's activations as its gradients appear, so the peak is
``max(a, g) + GRAD_OVERLAP × min(a, g)``, fitted on CPU against measured peak memory of the tiny and a
medium UNet: tests/train/test_plan.py, within ±25 %) + the cached dataset (latents and text embeddings stay on
the device) + a fixed CUDA context/workspace allowance.

Time per step = the larger of two floors, over the scaling efficiency:

- the GPU's: training FLOPs / (GPU peak dense bf16 TFLOPS × model FLOPs utilisation). Peak TFLOPS come from
  NVIDIA's datasheets (:data:`GPUS`); the MFU is an assumption (:data:`MFU_BIG` / :data:`MFU_SMALL`, by batch
  size) — check it against one real step on the target card and pass ``--mfu``;
- the host's: the step is a fixed sequence of kernels the host launches one at a time, whatever the batch,
  and at small batches the GPU waits for it. The same meta forward counts the operators that launch a
  kernel; :data:`HOST_S_PER_KERNEL` (calibrated on a measured H100 run) turns them into seconds, less under
  ``train.compile`` (:data:`COMPILED_HOST_SHARE`).

Cost = GPUs × hours × ``--usd-per-gpu-hour``.
"""

from __future__ import annotations

import contextlib
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdtune.config import RunConfig
from sdtune.models.families import FAMILIES, family_of


@dataclass(frozen=True)
class Gpu:
    memory_gb: float  # usable memory as the driver reports it (GiB)
    bf16_tflops: float  # dense (no sparsity), NVIDIA datasheet
    fp32_tflops: float  # TF32 dense for Ampere+ (what fp32 matmuls use by default in diffusers' scripts)


# Source: NVIDIA datasheets (A100: "NVIDIA A100 Tensor Core GPU" datasheet, SXM; H100/H200: "H100 Tensor
# Core GPU" / "H200" datasheets, SXM; L4, L40S, A10: product datasheets). Dense figures (half the
# "with sparsity" ones).
GPUS: dict[str, Gpu] = {
    "a100-40gb": Gpu(39.4, 312, 156),
    "a100-80gb": Gpu(79.2, 312, 156),
    "h100-80gb": Gpu(79.1, 989, 495),
    "h200-141gb": Gpu(139.8, 989, 495),
    "l40s-48gb": Gpu(44.4, 362, 183),
    "l4-24gb": Gpu(22.0, 121, 60),
    "a10-24gb": Gpu(22.0, 125, 62),
}
# Assumed model-FLOPs utilisation of a UNet training step (bf16; fp32: the same share of TF32): small
# batches leave the GPU launch- and memory-bound. MFU_BIG at ≥ 8 × 64² latents per GPU step, MFU_SMALL at
# one 64² latent, log-linear between. Assumptions, not measurements: pass --mfu after timing one real step.
MFU_BIG, MFU_SMALL = 0.30, 0.12
# The host's floor under a GPU step. Measured on an H100 (docs/performance.md, "H100 results", 2026-11-26,
# torch 2.11, eager, bf16 autocast, LoRA rank 4 on to_q/to_k/to_v/to_out.0): SD 1.5 at 512 px took 170–191
# ms a step from batch 1 to 16, flat while the FLOPs grew 16×: the GPU waited for the host. Calibration:
# each measured step over the kernel-launching operators this module counts in that model's forward
# (KernelCounter: LoRA'd, SDPA as one): SD 1.5 512 px b1 170.5 ms / 1,271 = 0.134 ms, SDXL 1024 px b1 486.7 ms
# / 4,232 = 0.115 ms per forward kernel (its backward and optimizer share included); their geometric mean
# plans both within ±8 % (tests/train/test_plan.py). A property of that host's CPU and of that torch: a
# faster host lowers it. That run still had peft's input casts (12 % of its kernels, since removed), so
# today's eager step should come in somewhat under the plan.
H100_EAGER_STEPS = {"sd15 512 px b1": (1271, 0.1705), "sdxl 1024 px b1": (4232, 0.4867)}  # (kernels, s/step)
HOST_S_PER_KERNEL = math.prod(s / k for k, s in H100_EAGER_STEPS.values()) ** (1 / len(H100_EAGER_STEPS))
# The host's share left under train.compile=default, same run: SD 1.5 b1 109.0 ms against 170.5 eager
# (inductor fuses the elementwise kernels; the host still launches the rest). regional: this share on the
# kernels inside the compiled blocks, the rest eager. graphs (CUDA graph replay) should remove most of the
# floor but is not measured yet, so it is planned like default.
COMPILED_HOST_SHARE = 0.1090 / 0.1705
SCALING = {"ddp": 0.95, "fsdp": 0.88}  # per-GPU efficiency once N > 1 (gradient all-reduce / gathers)
CUDA_OVERHEAD_GB = 1.0  # CUDA context, cuBLAS/cuDNN workspaces
ACTIVATION_FACTOR = 1.0  # peak / saved activations, fitted on CPU (tests/train/test_plan.py): the meta count
# already models fused attention, so nothing is left over
GRAD_OVERLAP = 0.3  # backward frees activations as it creates gradients: peak ≈ max + 0.3 × min of the two
HALF_ACTIVATION_SHARE = 0.55  # bf16/fp16 autocast: most saved tensors halve, norms/softmax stats stay fp32

# The real UNet/text-encoder configs for hub ids (diffusers' config.json of each model, abridged to the
# keys that differ from the defaults).
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SD2_UNET = {
    **SD15_UNET,
    "sample_size": 96,
    "cross_attention_dim": 1024,
    "attention_head_dim": [5, 10, 20, 20],
    "use_linear_projection": True,
}
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "layers_per_block": 2,
    "cross_attention_dim": 2048,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "projection_dim": 768,
    "architectures": ["CLIPTextModel"],
}
OPENCLIP_H = {
    **CLIP_L,
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_attention_heads": 16,
    "num_hidden_layers": 23,
    "projection_dim": 1024,
}
OPENCLIP_BIGG = {
    **CLIP_L,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "architectures": ["CLIPTextModelWithProjection"],
}
VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "latent_channels": 4,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
HUB = {
    "sd15": (SD15_UNET, [CLIP_L]),
    "sd2": (SD2_UNET, [OPENCLIP_H]),
    "sdxl": (SDXL_UNET, [CLIP_L, OPENCLIP_BIGG]),
}
GB = 1024**3

# SD3 medium (stabilityai/stable-diffusion-3-medium-diffusers): diffusers' config.json of the transformer,
# the three text encoders and the VAE, abridged as above. Built on the meta device they count 2,028.3 M
# (MMDiT), 123.7 M (CLIP-L with projection), 694.7 M (OpenCLIP bigG with projection), 4,762.3 M (T5 v1.1 XXL
# encoder) and 83.8 M (16-channel VAE) parameters: tests/train/test_plan_sd3.py.
SD3_TRANSFORMER = {
    "sample_size": 128,
    "patch_size": 2,
    "in_channels": 16,
    "out_channels": 16,
    "num_layers": 24,
    "attention_head_dim": 64,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "caption_projection_dim": 1536,
    "pooled_projection_dim": 2048,
    "pos_embed_max_size": 192,
}
CLIP_L_WITH_PROJECTION = {**CLIP_L, "architectures": ["CLIPTextModelWithProjection"]}
T5_XXL = {
    "model_type": "t5",
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 24,
    "feed_forward_proj": "gated-gelu",
    "vocab_size": 32128,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
}
SD3_VAE = {**VAE, "latent_channels": 16, "use_quant_conv": False, "use_post_quant_conv": False}
SD3_ENCODERS = ("text_encoder", "text_encoder_2", "text_encoder_3")


@dataclass
class Plan:
    """Every number ``sdtune plan`` prints (bytes per GPU unless named otherwise)."""

    method: str
    arch: str
    gpu: str
    num_gpus: int
    parallelism: str
    precision: str
    resolution: int
    batch_per_gpu: int
    grad_accum: int
    gradient_checkpointing: bool
    compile: str
    params_unet: int
    params_text_encoders: int
    params_vae: int
    params_trainable: int
    weights: float
    grads: float
    optimizer: float
    activations: float
    backward_peak: float  # gradients and activations together, as they overlap
    data_cache: float
    overhead: float
    total: float
    capacity: float
    fits: bool
    fwd_tflop_per_sample: float
    seconds_per_step: float
    steps: int
    hours: float
    usd: float
    usd_per_gpu_hour: float
    mfu: float  # the GPU's utilisation while it computes (assumed, or --mfu)
    compute_seconds_per_step: float = 0.0  # the GPU's floor: FLOPs / (peak × mfu)
    host_seconds_per_step: float = 0.0  # the host's floor: kernels × HOST_S_PER_KERNEL (× the compile share)
    bound: str = "compute"  # which floor sets seconds_per_step: "compute" or "host"
    effective_mfu: float = 0.0  # FLOPs / (seconds_per_step × peak): what the step achieves
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# ----------------------------------------------------------------------------------------- model configs


def model_configs(cfg: RunConfig) -> tuple[dict, list[dict], dict]:
    """(unet, text encoders, vae) config dicts: from the local folder when there is one, else the hub table."""
    base = Path(cfg.model.base)
    if (base / "unet" / "config.json").is_file():
        unet = json.loads((base / "unet" / "config.json").read_text())
        encoders = [
            json.loads((base / d / "config.json").read_text())
            for d in ("text_encoder", "text_encoder_2")
            if (base / d / "config.json").is_file()
        ]
        vae = (
            json.loads((base / "vae" / "config.json").read_text())
            if (base / "vae" / "config.json").is_file()
            else VAE
        )
        return unet, encoders, vae
    if cfg.model.arch not in HUB:
        from sdtune.errors import ConfigError

        raise ConfigError(f"the planner has no model of model.arch={cfg.model.arch} yet")
    unet, encoders = HUB[cfg.model.arch]
    return unet, encoders, VAE


def meta_unet(unet_config: dict):
    from diffusers import UNet2DConditionModel

    keys = {k: v for k, v in unet_config.items() if not k.startswith("_")}
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(keys)


def count_params(module: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def meta_encoder(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = {k: v for k, v in config.items() if k in CLIPTextConfig().to_dict()}
    with torch.device("meta"):
        with_projection = config.get("architectures") == ["CLIPTextModelWithProjection"]
        cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
        return cls(CLIPTextConfig(**keys))


def encoder_params(config: dict) -> int:
    return count_params(meta_encoder(config))


def encoder_kernels(config: dict) -> int:
    """The GPU kernels of one CLIP text-encoder forward over 77 tokens (:class:`KernelCounter`, meta device)."""
    encoder = meta_encoder(config)
    with torch.device("meta"):
        ids = torch.zeros(1, 77, dtype=torch.long)
    kernels = KernelCounter()
    with kernels, _flash_attention(kernels):
        encoder(ids)
    return kernels.total


def vae_params(config: dict) -> int:
    from diffusers import AutoencoderKL

    with torch.device("meta"):
        return count_params(
            AutoencoderKL.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        )


def lora_params(unet, cfg: RunConfig) -> int:
    from peft import LoraConfig

    tc = cfg.train
    unet.add_adapter(LoraConfig(r=tc.rank, lora_alpha=tc.alpha or tc.rank, target_modules=tc.target_modules))
    return count_params(unet, trainable_only=True)


def _needing_grads(model, lora: RunConfig | None):
    """``model`` with ``lora``'s adapters as its only trainable weights, or every weight trainable (no LoRA)."""
    if lora is not None:
        lora_params(model, lora)
    else:
        model.requires_grad_(True)
    return model


# ------------------------------------------------------------------------------------ meta forward pass


@dataclass
class ForwardProfile:
    saved_bytes: int  # everything autograd keeps for backward (fp32)
    max_block_bytes: int  # the largest checkpointable block's share
    boundary_bytes: int  # inputs of checkpointable blocks (what gradient checkpointing keeps)
    flops: int  # forward FLOPs of the batch
    kernels: int = 0  # forward operators that launch a GPU kernel (KernelCounter)
    kernels_in_regions: int = 0  # those inside the blocks train.compile=regional compiles


def profile_forward(
    unet_config: dict,
    resolution: int,
    batch: int,
    encoder_dim: int | None = None,
    lora: RunConfig | None = None,
) -> ForwardProfile:
    """One UNet forward on the meta device: saved-activation bytes, per block, and FLOPs."""
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    unet = _needing_grads(meta_unet(unet_config), lora)
    cfg = unet.config
    latent = resolution // 8
    dim = encoder_dim or cfg.cross_attention_dim
    with torch.device("meta"):
        x = torch.empty(batch, cfg.in_channels, latent, latent)
        t = torch.zeros(batch, dtype=torch.long)
        ctx = torch.empty(batch, 77, dim)
        kwargs = {}
        if cfg.addition_embed_type == "text_time":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            kwargs["added_cond_kwargs"] = {
                "text_embeds": torch.empty(batch, pooled),
                "time_ids": torch.empty(batch, 6),
            }

    blocks = (BasicTransformerBlock, ResnetBlock2D)
    return profile_blocks(unet, blocks, lambda: unet(x, t, encoder_hidden_states=ctx, **kwargs))


def profile_blocks(
    model: torch.nn.Module, block_types: tuple[type, ...], forward, keyword_inputs: bool = False
) -> ForwardProfile:
    """Run ``forward()`` (a meta forward of ``model``) counting what autograd saves, in all and per block of
    ``block_types`` (the checkpointable units), the blocks' input bytes (positional ones; keyword ones too
    with ``keyword_inputs``, for blocks called by keyword), and the FLOPs."""
    from torch.utils.flop_counter import FlopCounterMode

    from sdtune.train.compile import repeated_blocks

    saved = [0]
    block_stack: list[list[int]] = []
    blocks: list[int] = []
    boundary = [0]

    # Count each storage once (views and tensors saved by several ops share it) and never the weights
    # (resident anyway: they are counted as weights).
    seen = {p.untyped_storage()._cdata for p in model.parameters()}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in seen:
            seen.add(storage._cdata)
            size = storage.nbytes()
            saved[0] += size
            if block_stack:
                block_stack[-1][0] += size
        return tensor

    def pre(module, args, kwargs):
        block_stack.append([0])
        inputs = [*args, *kwargs.values()] if keyword_inputs else args
        boundary[0] += sum(a.numel() * a.element_size() for a in inputs if isinstance(a, torch.Tensor))

    def post(module, args, output):
        blocks.append(block_stack.pop()[0])

    hooks = []
    for module in model.modules():
        if isinstance(module, block_types):
            hooks += [
                module.register_forward_pre_hook(pre, with_kwargs=True),
                module.register_forward_hook(post),
            ]
    kernels = KernelCounter()
    hooks += kernels.watch(repeated_blocks(model))
    counter = FlopCounterMode(display=False)
    with (
        torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
        counter,
        kernels,
        _flash_attention(kernels),
    ):
        forward()
    for h in hooks:
        h.remove()
    return ForwardProfile(
        saved[0],
        max(blocks or [0]),
        boundary[0],
        counter.get_total_flops(),
        kernels.total,
        kernels.in_regions,
    )


class KernelCounter(TorchDispatchMode):
    """Counts the operators of a forward that launch a GPU kernel: views and bare allocations launch none,
    and a fused attention call is one kernel (:func:`_flash_attention` counts it and hides its meta-device
    decomposition). Operators run inside the modules given to :meth:`watch` are also counted apart."""

    NO_KERNEL = frozenset({"_unsafe_view", "empty", "new_empty", "empty_like", "empty_strided", "lift_fresh"})

    def __init__(self) -> None:
        super().__init__()
        self.total = self.in_regions = self._depth = 0
        self.paused = False

    def add(self, n: int = 1) -> None:
        self.total += n
        if self._depth:
            self.in_regions += n

    def watch(self, regions: list[torch.nn.Module]) -> list:
        def enter(*_):
            self._depth += 1

        def leave(*_):
            self._depth -= 1

        return [
            h for m in regions for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))
        ]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not (self.paused or func.is_view or func.overloadpacket.__name__ in self.NO_KERNEL):
            self.add()
        return func(*args, **(kwargs or {}))


class _SavesLikeFlash(torch.autograd.Function):
    """What a fused attention kernel keeps for backward: q, k, v, the output and the row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, out):
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1]))
        return out.view_as(out)


@contextlib.contextmanager
def _flash_attention(kernels: KernelCounter):
    """On the meta device SDPA falls back to the math kernel, which saves the whole attention matrix; GPUs
    (flash / memory-efficient kernels) and CPUs (the flash CPU kernel) do not. Count FLOPs with the real op
    under no_grad, the saved tensors of a fused kernel, and one kernel."""
    import torch.nn.functional as F

    real = F.scaled_dot_product_attention

    def sdpa(q, k, v, *args, **kwargs):
        kernels.add()
        kernels.paused = True
        try:
            with torch.no_grad():
                out = real(q, k, v, *args, **kwargs)
        finally:
            kernels.paused = False
        return _SavesLikeFlash.apply(q, k, v, out)

    F.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = real


# ---------------------------------------------------------------------------------------------- the plan


def host_seconds(prof: ForwardProfile, compile_mode: str, passes: float) -> float:
    """The host's floor of one step over the denoiser: :data:`HOST_S_PER_KERNEL` per kernel of its forward
    (fewer under ``compile_mode``), scaled like the FLOPs by the ``passes`` over the model (the calibration
    step made 2: forward, backward to the inputs)."""
    compiled = {"none": 0, "regional": prof.kernels_in_regions}.get(compile_mode, prof.kernels)
    return (prof.kernels - compiled * (1 - COMPILED_HOST_SHARE)) * HOST_S_PER_KERNEL * passes / 2


def text_encoder_host_seconds(configs: list[dict], passes: float, compile_mode: str = "none") -> float:
    """The host's floor of the CLIP text encoders of ``configs`` making ``passes`` over their model each step
    (:func:`text_encoder_kernel_seconds`); nothing is counted when they make none."""
    if not passes:
        return 0.0
    return text_encoder_kernel_seconds(sum(encoder_kernels(c) for c in configs), passes, compile_mode)


def text_encoder_kernel_seconds(kernels: int, passes: float, compile_mode: str) -> float:
    """The host's floor of text encoders whose forward launches ``kernels``, making ``passes`` over their model
    each step, compiled as ``compile_mode`` says (``regional`` compiles their layers, which hold nearly all
    of their kernels)."""
    share = 1.0 if compile_mode == "none" else COMPILED_HOST_SHARE
    return kernels * share * HOST_S_PER_KERNEL * passes / 2


def with_host_note(plan: Plan) -> Plan:
    """``plan`` with the host-bound note added when the host's floor sets its step time."""
    if plan.bound == "host":
        plan.notes.append(host_bound_note(plan))
    return plan


def host_bound_note(plan: Plan) -> str:
    return (
        f"host-bound: at this batch the GPU waits for the host to launch the step's kernels "
        f"({plan.host_seconds_per_step * 1000:.0f} ms/step, calibrated on an H100 host; the GPU's own work "
        f"would take {plan.compute_seconds_per_step * 1000:.0f} ms), so a larger batch costs little more time "
        "until the GPU's work catches up"
        + (
            f"; train.compile=default cuts the host's share to ~{COMPILED_HOST_SHARE:.0%}"
            if plan.compile == "none"
            else ""
        )
    )


def backward_peak(activations: float, grads: float) -> float:
    return max(activations, grads) + GRAD_OVERLAP * min(activations, grads)


def mfu_for(batch: int, resolution: int) -> float:
    """The assumed MFU for ``batch`` images of ``resolution`` px per GPU step (see MFU_BIG/MFU_SMALL)."""
    work = batch * (resolution / 512) ** 2  # in 64×64-latent units
    if work >= 8:
        return MFU_BIG
    if work <= 1:
        return MFU_SMALL
    return MFU_SMALL + (MFU_BIG - MFU_SMALL) * math.log(work) / math.log(8)


def gpu_key(name: str) -> str:
    """The :data:`GPUS` key for a name as people write it: ``h100``, ``H100 80GB``, ``nvidia-a100-80``.

    A family with one memory size needs no size; ``a100`` (40 or 80 GB) must say which."""
    from sdtune.errors import ConfigError

    wanted = name.strip().lower().replace("_", "-").replace(" ", "-").removeprefix("nvidia-")
    if wanted in GPUS:
        return wanted
    matches = [key for key in GPUS if key.split("-")[0] == wanted] or [
        key for key in GPUS if key.startswith(wanted) or key.replace("gb", "") == wanted
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise ConfigError(f"--gpu {name!r} is ambiguous: {' or '.join(matches)}")
    raise ConfigError(f"unknown --gpu {name!r}; one of {', '.join(GPUS)}")


def estimate(
    cfg: RunConfig,
    gpu: str = "a100-80gb",
    num_gpus: int | None = None,
    usd_per_gpu_hour: float = 2.0,
    num_images: int = 1000,
    mfu: float | None = None,
) -> Plan:
    """The plan for ``cfg`` on ``num_gpus`` (default ``train.num_processes``) × ``gpu``.
    ``train.gradient_checkpointing=auto`` is planned as :func:`checkpointing_choice` resolves it there."""
    if cfg.train.gradient_checkpointing == "auto":
        choice = checkpointing_choice(cfg, gpu, num_gpus, num_images)
        plan = estimate(
            with_checkpointing(cfg, choice.enabled), gpu, num_gpus, usd_per_gpu_hour, num_images, mfu
        )
        plan.notes.insert(0, f"gradient checkpointing: {choice.describe()}")
        return plan
    if family_of(cfg).denoiser == "transformer":  # SD3: its own model, see estimate_sd3
        return estimate_sd3(
            cfg, gpu_key(gpu), num_gpus or cfg.train.num_processes, usd_per_gpu_hour, num_images, mfu
        )
    gpu = gpu_key(gpu)
    card = GPUS[gpu]
    tc = cfg.train
    n = num_gpus or tc.num_processes
    res = cfg.preprocess.resolution
    unet_cfg, enc_cfgs, vae_cfg = model_configs(cfg)
    p_unet = count_params(meta_unet(unet_cfg))
    p_enc = [encoder_params(c) for c in enc_cfgs]
    p_vae = vae_params(vae_cfg)
    half = tc.mixed_precision in ("bf16", "fp16")
    wbytes = 2 if half else 4
    fsdp = tc.parallelism == "fsdp" and n > 1
    notes: list[str] = []

    # What trains, and what stays resident during the loop (VAE/text encoders are freed after caching,
    # except textual inversion/pivotal, whose text encoders run every step).
    encoder_dim = sum(c["hidden_size"] for c in enc_cfgs) if cfg.model.arch == "sdxl" and enc_cfgs else None
    full_unet = tc.method in ("dreambooth", "full") or (tc.method == "inpaint" and tc.inpaint_full_unet)
    if full_unet:
        trainable = p_unet
        weights = 4 * p_unet  # fp32 master weights; autocast does the half-precision maths
        if tc.option("use_ema"):
            weights += 4 * p_unet  # the EMA copy
            notes.append("EMA: one more fp32 copy of the UNet")
        if tc.option("train_text_encoder"):  # DreamBooth: the whole encoder(s) too, fp32 like the UNet
            trainable += sum(p_enc)
            weights += 4 * sum(p_enc)
            notes.append("the text encoder(s) train too: fp32 weights, gradients and AdamW state")
    elif tc.method == "textual_inversion":
        trainable = tc.num_vectors * sum(c["hidden_size"] for c in enc_cfgs)
        weights = wbytes * p_unet + 4 * sum(p_enc)
    else:
        trainable = lora_params(meta_unet(unet_cfg), cfg)
        if tc.method == "pivotal":
            trainable += tc.num_vectors * sum(c["hidden_size"] for c in enc_cfgs)
        te_lora = sum(clip_lora_params(c, cfg) for c in enc_cfgs) if tc.option("train_text_encoder") else 0
        trainable += te_lora
        weights = wbytes * p_unet + 4 * (trainable if tc.method == "lora" else sum(p_enc))
        if te_lora:  # the encoders stay for the loop, in the training precision, under their fp32 LoRA
            weights += wbytes * sum(p_enc)
            notes.append("the text encoder(s) stay resident for the loop under their LoRA")
    grads = 4 * trainable
    optimizer = {"adamw": 8, "adamw8bit": 2}.get(tc.optimizer, 0) * trainable
    if fsdp:
        weights, grads, optimizer = weights / n, grads / n, optimizer / n
        weights += 4 * p_unet / 40  # the unit being all-gathered (largest SDXL transformer block ≈ 1/40)
        notes.append("FSDP2: weights, gradients and AdamW state sharded over the GPUs")

    # Activations from the meta forward (instance + class batch under prior preservation).
    batch = tc.batch_size * (2 if tc.option("with_prior_preservation") else 1)
    prof = profile_forward(
        unet_cfg, res, batch, encoder_dim, lora=cfg if tc.method in ("lora", "pivotal") else None
    )
    saved = prof.boundary_bytes + prof.max_block_bytes if tc.gradient_checkpointing else prof.saved_bytes
    activations = saved * ACTIVATION_FACTOR * (HALF_ACTIVATION_SHARE if half else 1.0)

    # The cached dataset lives on the device: latent mean+std and the text conditioning, per image.
    latent = (res // 8) ** 2 * 4 * 2
    text = 77 * (encoder_dim or unet_cfg.get("cross_attention_dim", 768))
    per_image = (latent + text) * wbytes
    images_here = math.ceil(num_images / n)
    data_cache = per_image * images_here * (2 if tc.option("with_prior_preservation") else 1)
    if tc.method == "full":  # latents are cached on disk in shards and read a batch at a time
        data_cache = per_image * tc.batch_size
    if data_cache > 0.1 * card.memory_gb * GB:
        notes.append(
            f"the cached dataset ({data_cache / GB:.1f} GiB per GPU) stays on the device: "
            "shard it over more GPUs or train on a subset"
        )
    overhead = CUDA_OVERHEAD_GB * GB
    peak = backward_peak(activations, grads)
    total = weights + optimizer + peak + data_cache + overhead
    capacity = card.memory_gb * GB
    if tc.gradient_checkpointing:  # recomputing the forward costs a third more work: worth it only if needed
        plain = prof.saved_bytes * ACTIVATION_FACTOR * (HALF_ACTIVATION_SHARE if half else 1.0)
        without = total - peak + backward_peak(plain, grads)
        if without <= capacity:
            notes.append(
                f"fits without gradient checkpointing too ({without / GB:.1f} GiB of {card.memory_gb:.0f}): "
                "train.gradient_checkpointing=false saves the forward recomputation (about 1/4 of the step)"
            )
    notes.append(
        "time is the training loop only: model loading, the one-off VAE/text encoding, class-image generation, "
        "validation and evaluation are not included"
    )

    # Time: forward FLOPs × (1 forward + 2 backward for weights and inputs; LoRA/TI skip most weight grads)
    # + 1 forward recompute under gradient checkpointing.
    fwd = prof.flops / batch
    passes = 3.0 if full_unet else 2.0
    passes += 1.0 if tc.gradient_checkpointing else 0.0
    # Text encoders that run in the step (trained, or carrying new rows): 2 FLOPs per weight per token and
    # pass (text_encoder_passes).
    te_passes = text_encoder_passes(cfg, whole=full_unet)
    te_flops = 2 * sum(p_enc) * 77 * te_passes
    flops_step = (fwd * passes + te_flops) * batch * tc.gradient_accumulation_steps
    host = host_seconds(prof, tc.compile, passes) + text_encoder_host_seconds(enc_cfgs, te_passes, tc.compile)
    host *= tc.gradient_accumulation_steps
    mfu = mfu if mfu is not None else mfu_for(tc.batch_size, res)
    plan = Plan(
        **plan_settings(cfg, gpu, n, "fsdp" if fsdp else "ddp"),
        params_unet=p_unet,
        params_text_encoders=sum(p_enc),
        params_vae=p_vae,
        params_trainable=trainable,
        weights=weights,
        grads=grads,
        optimizer=optimizer,
        activations=activations,
        backward_peak=peak,
        data_cache=data_cache,
        overhead=overhead,
        total=total,
        capacity=capacity,
        fits=total <= capacity,
        fwd_tflop_per_sample=fwd / 1e12,
        **plan_time(cfg, flops_step, card, half, n, "fsdp" if fsdp else "ddp", mfu, usd_per_gpu_hour, host),
        notes=notes,
    )
    return with_host_note(plan)


def text_encoder_passes(cfg: RunConfig, whole: bool = False) -> float:
    """Passes over the text encoders per step, counted like the denoiser's (a forward, a backward to the
    inputs, a backward to the weights): a trained encoder 3 when it trains ``whole`` (beside a whole UNet),
    2 under its LoRA; textual inversion's new rows 2; pivotal tuning 1 (its encoders run every step) plus 1
    during its embedding phase; none where the prompts' embeddings are cached."""
    tc = cfg.train
    if tc.option("train_text_encoder"):
        return 3.0 if whole else 2.0
    if tc.method == "textual_inversion":
        return 2.0
    return 1.0 + tc.option("embedding_train_fraction") if tc.method == "pivotal" else 0.0


def plan_settings(cfg: RunConfig, gpu: str, n: int, parallelism: str) -> dict[str, Any]:
    """The :class:`Plan` fields that restate the run's settings (every family's estimate)."""
    tc = cfg.train
    return {
        "method": tc.method,
        "arch": cfg.model.arch,
        "gpu": gpu,
        "num_gpus": n,
        "parallelism": parallelism,
        "precision": tc.mixed_precision,
        "resolution": cfg.preprocess.resolution,
        "batch_per_gpu": tc.batch_size,
        "grad_accum": tc.gradient_accumulation_steps,
        "gradient_checkpointing": tc.gradient_checkpointing,
        "compile": tc.compile,
        "steps": tc.max_steps,
    }


def plan_time(
    cfg: RunConfig,
    flops_step: float,
    card: Gpu,
    half: bool,
    n: int,
    parallelism: str,
    mfu: float,
    usd_per_gpu_hour: float,
    host_s: float,
) -> dict[str, Any]:
    """The :class:`Plan` time and cost fields for ``flops_step`` training FLOPs per optimizer step and GPU
    and a host floor of ``host_s`` seconds per step: the step takes the longer of the two."""
    tflops = (card.bf16_tflops if half else card.fp32_tflops) * 1e12
    compute = flops_step / (tflops * mfu)
    seconds = max(compute, host_s)
    if n > 1:
        seconds /= SCALING[parallelism]
    hours = seconds * cfg.train.max_steps / 3600
    return {
        "seconds_per_step": seconds,
        "hours": hours,
        "usd": hours * n * usd_per_gpu_hour,
        "usd_per_gpu_hour": usd_per_gpu_hour,
        "mfu": mfu,
        "compute_seconds_per_step": compute,
        "host_seconds_per_step": host_s,
        "bound": "host" if host_s > compute else "compute",
        "effective_mfu": flops_step / (seconds * tflops),
    }


# ------------------------------------------------------------------------------ SD3: MMDiT, flow matching


def sd3_model_configs(cfg: RunConfig) -> tuple[dict, list[dict], dict]:
    """(transformer, text encoders, vae) config dicts: from the local folder when there is one, else SD3 medium."""
    base = Path(cfg.model.base)
    if not (base / "transformer" / "config.json").is_file():
        return SD3_TRANSFORMER, [CLIP_L_WITH_PROJECTION, OPENCLIP_BIGG, T5_XXL], SD3_VAE
    found = {d: base / d / "config.json" for d in ("transformer", "vae", *SD3_ENCODERS)}
    read = {d: json.loads(f.read_text()) for d, f in found.items() if f.is_file()}
    return read["transformer"], [read[d] for d in SD3_ENCODERS if d in read], read.get("vae", SD3_VAE)


def meta_transformer(config: dict):
    from diffusers import SD3Transformer2DModel

    with torch.device("meta"):
        return SD3Transformer2DModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})


def sd3_encoder_params(config: dict) -> int:
    """Parameters of one SD3 text encoder: T5 (its encoder only) or CLIP."""
    if config.get("model_type") != "t5":
        return encoder_params(config)
    from transformers import T5Config, T5EncoderModel

    keys = {k: v for k, v in config.items() if k in T5Config().to_dict()}
    with torch.device("meta"):
        return count_params(T5EncoderModel(T5Config(**keys)))


def clip_lora_params(config: dict, cfg: RunConfig) -> int:
    """Parameters of ``train_text_encoder``'s LoRA on one CLIP encoder (``text_encoder_target_modules``)."""
    from peft import LoraConfig
    from transformers import CLIPTextConfig, CLIPTextModel

    tc = cfg.train
    keys = {k: v for k, v in config.items() if k in CLIPTextConfig().to_dict()}
    with torch.device("meta"):
        encoder = CLIPTextModel(CLIPTextConfig(**keys))
    encoder.requires_grad_(False)
    rank = tc.rank
    encoder.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=tc.text_encoder_target_modules))
    return count_params(encoder, trainable_only=True)


def profile_sd3_forward(
    transformer_config: dict, resolution: int, batch: int, text_tokens: int, lora: RunConfig | None
) -> ForwardProfile:
    """One transformer forward on the meta device at the training resolution, with the joint sequence of
    ``text_tokens`` prompt tokens (77 CLIP + train.max_sequence_length T5): with ``lora``'s adapters, or every
    weight needing its gradient (a full fine-tune; textual inversion back-propagates through it all too)."""
    from diffusers.models.attention import JointTransformerBlock

    transformer = _needing_grads(meta_transformer(transformer_config), lora)
    c = transformer.config
    with torch.device("meta"):
        inputs = {
            "hidden_states": torch.empty(batch, c.in_channels, resolution // 8, resolution // 8),
            "timestep": torch.zeros(batch),
            "encoder_hidden_states": torch.empty(batch, text_tokens, c.joint_attention_dim),
            "pooled_projections": torch.empty(batch, c.pooled_projection_dim),
        }
    return profile_blocks(
        transformer, (JointTransformerBlock,), lambda: transformer(**inputs), keyword_inputs=True
    )


def estimate_sd3(
    cfg: RunConfig, gpu: str, n: int, usd_per_gpu_hour: float, num_images: int, mfu: float | None
) -> Plan:
    """The plan of an SD3 run, any method: the transformer frozen in the training precision under fp32
    adapters (LoRA, pivotal) or new rows (textual inversion), or trained whole in fp32 (DreamBooth, full; EMA
    and FSDP as for the UNet). The three text encoders and the VAE run once, in fp32, to cache latents and
    prompt embeddings — a phase of its own that must fit too; CLIP stays for the loop when it trains
    (new rows, ``train_text_encoder``)."""
    card, tc, res = GPUS[gpu], cfg.train, cfg.preprocess.resolution
    transformer_cfg, enc_cfgs, vae_cfg = sd3_model_configs(cfg)
    p_enc = [sd3_encoder_params(c) for c in enc_cfgs]
    clips = [c for c in enc_cfgs if c.get("model_type") != "t5"]
    p_clip = sum(sd3_encoder_params(c) for c in clips)
    full = tc.method in ("dreambooth", "full")
    adapters = tc.method in ("lora", "pivotal")
    rows = tc.num_vectors * sum(c["hidden_size"] for c in clips) if tc.option("num_vectors") else 0
    te_lora = sum(clip_lora_params(c, cfg) for c in clips) if tc.option("train_text_encoder") else 0
    p_transformer = count_params(meta_transformer(transformer_cfg))
    lora = lora_params(meta_transformer(transformer_cfg), cfg) if adapters else 0
    trainable = p_transformer if full else lora + rows + te_lora
    sizes = {  # the transformer is reported in the denoiser's row (params_unet)
        "params_unet": p_transformer,
        "params_text_encoders": sum(p_enc),
        "params_vae": vae_params(vae_cfg),
        "params_trainable": trainable,
    }
    half = tc.mixed_precision in ("bf16", "fp16")
    wbytes = 2 if half else 4
    fsdp = full and tc.parallelism == "fsdp" and n > 1
    if full:  # fp32 master weights (+ the EMA copy); autocast does the half-precision maths
        weights = 4 * p_transformer * (2 if tc.option("use_ema") else 1)
    else:  # the CLIP encoders stay when they train: fp32 under new rows, the training precision under LoRA
        clip_loop = 4 * p_clip if rows else wbytes * p_clip if te_lora else 0
        weights = wbytes * p_transformer + 4 * trainable + clip_loop
    memory = {
        "weights": weights,
        "grads": 4 * trainable,
        "optimizer": {"adamw": 8, "adamw8bit": 2}.get(tc.optimizer, 0) * trainable,
    }
    if fsdp:
        memory = {k: v / n for k, v in memory.items()}
        memory["weights"] += 4 * p_transformer / transformer_cfg["num_layers"]  # the block being all-gathered
    tokens = 77 + tc.max_sequence_length
    batch = tc.batch_size * (2 if tc.option("with_prior_preservation") else 1)
    prof = profile_sd3_forward(transformer_cfg, res, batch, tokens, lora=cfg if adapters else None)
    saved = prof.boundary_bytes + prof.max_block_bytes if tc.gradient_checkpointing else prof.saved_bytes
    memory["activations"] = saved * ACTIVATION_FACTOR * (HALF_ACTIVATION_SHARE if half else 1.0)
    memory["backward_peak"] = backward_peak(memory["activations"], memory["grads"])
    # Cached per image on the device: the latent mean and std, the joint prompt embeddings and the pooled one
    # (for a full fine-tune a batch at a time, read from disk shards).
    latent = (res // 8) ** 2 * transformer_cfg["in_channels"] * 2
    text = tokens * transformer_cfg["joint_attention_dim"] + transformer_cfg["pooled_projection_dim"]
    images = tc.batch_size if tc.method == "full" else math.ceil(num_images / n) * (batch // tc.batch_size)
    memory["data_cache"] = (latent + text) * wbytes * images
    memory["overhead"] = CUDA_OVERHEAD_GB * GB
    loop = ("weights", "optimizer", "backward_peak", "data_cache", "overhead")
    memory["total"] = sum(memory[k] for k in loop)
    capacity = card.memory_gb * GB
    encoding = 4 * (sum(p_enc) + sizes["params_vae"]) + memory["overhead"]
    mfu = mfu if mfu is not None else mfu_for(tc.batch_size, res)
    notes = [
        f"SD3 transformer (MMDiT), {tc.method}, flow matching; the {len(p_enc)} text encoders "
        f"({sum(p_enc) / 1e9:.2f} B parameters, the largest {max(p_enc) / 1e9:.2f} B) and the VAE run once, "
        f"in fp32, to cache the embeddings: that phase needs {encoding / GB:.1f} GiB on its own",
        f"the MFU ({mfu:.0%}) is the UNet assumption and the host's floor is calibrated on UNets; time one "
        "real SD3 step and pass --mfu",
    ]
    if fsdp:
        notes.append("FSDP2: weights, gradients and AdamW state sharded over the GPUs (joint blocks)")
    fits = memory["total"] <= capacity and encoding <= capacity
    if encoding > capacity:
        notes.append(f"does not fit: caching the embeddings alone needs {encoding / GB:.1f} GiB")
    elif not fits:
        biggest = max(loop, key=lambda k: memory[k])
        notes.append(
            f"does not fit: the largest share is {biggest.replace('_', ' ')} ({memory[biggest] / GB:.1f} GiB)"
        )
    # Time: forward + backward to the inputs (+ the weights' gradients when all train) (+ a recompute).
    passes = (3.0 if full else 2.0) + (1.0 if tc.gradient_checkpointing else 0.0)
    flops_step = prof.flops * passes * tc.gradient_accumulation_steps
    # The host's floor, calibrated on UNets (HOST_S_PER_KERNEL): the CLIP encoders add theirs while they train.
    host = host_seconds(prof, tc.compile, passes)
    host += text_encoder_host_seconds(clips, text_encoder_passes(cfg), tc.compile)
    host *= tc.gradient_accumulation_steps
    plan = Plan(
        **plan_settings(cfg, gpu, n, "fsdp" if fsdp else "ddp"),
        **sizes,
        **memory,
        capacity=capacity,
        fits=fits,
        fwd_tflop_per_sample=prof.flops / batch / 1e12,
        **plan_time(cfg, flops_step, card, half, n, "fsdp" if fsdp else "ddp", mfu, usd_per_gpu_hour, host),
        notes=notes,
    )
    return with_host_note(plan)


def fitting_settings(
    cfg: RunConfig, gpu: str, num_gpus: int | None = None, num_images: int = 1000
) -> list[str]:
    """Override sets (``key=value …``) that the planner says fit ``gpu``, cheapest change first."""
    from sdtune.config import config_from_dict

    tc = cfg.train
    n = num_gpus or tc.num_processes
    tries: list[list[str]] = []
    if tc.gradient_checkpointing is False:  # auto already turned it on where that was needed
        tries.append(["train.gradient_checkpointing=true"])
    if tc.mixed_precision == "no":
        tries.append(["train.mixed_precision=bf16", "train.gradient_checkpointing=true"])
    b = tc.batch_size
    while b > 1:
        b //= 2
        accum = tc.gradient_accumulation_steps * (tc.batch_size // b)
        tries.append(
            [
                f"train.batch_size={b}",
                f"train.gradient_accumulation_steps={accum}",
                "train.gradient_checkpointing=true",
            ]
        )
    if tc.method in ("dreambooth", "full") and n > 1 and tc.parallelism != "fsdp":
        tries.append(
            [
                "train.parallelism=fsdp",
                "train.mixed_precision=bf16",
                "train.gradient_checkpointing=true",
                "train.batch_size=1",
                f"train.gradient_accumulation_steps={tc.gradient_accumulation_steps * tc.batch_size}",
            ]
        )
    fits = []
    base = cfg.model_dump(mode="json")
    for overrides in tries:
        try:
            if estimate(config_from_dict(base, overrides), gpu, n, num_images=num_images).fits:
                fits.append(" ".join(overrides))
        except Exception:  # an estimate that cannot be made is not advice
            continue
        if len(fits) == 2:
            break
    return fits


@dataclass(frozen=True)
class CheckpointingChoice:
    """What ``train.gradient_checkpointing`` resolves to for a run, and why."""

    enabled: bool
    reason: str

    def describe(self) -> str:
        return f"{'on' if self.enabled else 'off'} ({self.reason})"


def with_checkpointing(cfg: RunConfig, enabled: bool) -> RunConfig:
    from sdtune.config import config_from_dict

    value = "true" if enabled else "false"
    return config_from_dict(cfg.model_dump(mode="json"), [f"train.gradient_checkpointing={value}"])


def checkpointing_choice(
    cfg: RunConfig,
    gpu: str | None,
    num_gpus: int | None = None,
    num_images: int = 1000,
    capacity_bytes: float | None = None,
) -> CheckpointingChoice:
    """``train.gradient_checkpointing`` for a run on ``gpu`` (a :data:`GPUS` name; None: no GPU). ``auto``
    is off when the planner's training-loop memory without checkpointing fits the card (``capacity_bytes``:
    the real device's memory, else the table's) — recomputing the forward costs about a third more FLOPs —
    and on when it does not. On a CPU (no GPU) auto is off: host memory is not the limit it saves."""
    setting = cfg.train.gradient_checkpointing
    if setting != "auto":
        return CheckpointingChoice(bool(setting), "set in the config")
    if gpu is None:
        return CheckpointingChoice(False, "auto: no GPU, nothing to save accelerator memory for")
    try:
        plan = estimate(with_checkpointing(cfg, False), gpu, num_gpus, num_images=num_images)
    except Exception as err:  # noqa: BLE001 - a model the planner cannot size: the choice that cannot OOM
        why = str(err).splitlines()[0] if str(err) else type(err).__name__
        return CheckpointingChoice(True, f"auto: the planner cannot size this run ({why}), on to be safe")
    capacity = capacity_bytes if capacity_bytes is not None else plan.capacity
    need = f"the planner's estimate without it, {plan.total / GB:.1f} GiB, {{}} the {capacity / GB:.0f} GiB of {plan.gpu}"
    if plan.total <= capacity:
        return CheckpointingChoice(False, "auto: " + need.format("fits"))
    return CheckpointingChoice(True, "auto: " + need.format("does not fit"))


def checkpointing_for_device(
    cfg: RunConfig, device: torch.device, num_gpus: int, num_images: int
) -> CheckpointingChoice:
    """:func:`checkpointing_choice` for the device this process trains on (its real memory on CUDA)."""
    if torch.device(device).type != "cuda" or cfg.train.gradient_checkpointing != "auto":
        return checkpointing_choice(cfg, None)
    total = torch.cuda.get_device_properties(torch.device(device)).total_memory
    return checkpointing_choice(cfg, gpu_name_to_key(total), num_gpus, num_images, capacity_bytes=total)


def gpu_name_to_key(total_bytes: int) -> str:
    """The table entry closest in memory to a device (for advice after a real OOM)."""
    gib = total_bytes / GB
    return min(GPUS, key=lambda k: abs(GPUS[k].memory_gb - gib))


def out_of_memory_advice(cfg: RunConfig, exc: BaseException) -> str:
    """One paragraph for an OOM: what ran out, and settings the planner says would fit this card."""
    gpu = "a100-80gb"
    if torch.cuda.is_available():
        gpu = gpu_name_to_key(torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory)
    try:
        plan = estimate(cfg, gpu)
        fits = fitting_settings(cfg, gpu)
        need = f"the planner estimates {plan.total / GB:.1f} GiB per GPU for {plan.capacity / GB:.0f} GiB ({gpu})"
    except Exception as err:  # advice must never hide the OOM itself
        fits, need = [], f"planner unavailable: {err}"
    advice = (
        "; try: " + " | ".join(fits)
        if fits
        else "; no single change fits: use more GPUs with FSDP or a bigger card"
    )
    first = str(exc).splitlines()[0] if str(exc) else "CUDA out of memory"
    return f"out of accelerator memory ({first}); {need}{advice} (see `sdtune plan`)"


# ------------------------------------------------------------------------------------------------ report


def report(plan: Plan) -> str:
    def gib(x: float) -> str:
        return f"{x / GB:8.2f} GiB"

    lines = [
        f"{plan.method} · {plan.arch} · {plan.resolution} px · {plan.num_gpus}× {plan.gpu} · {plan.parallelism} · "
        f"{plan.precision} · batch {plan.batch_per_gpu}×{plan.grad_accum} per GPU"
        + (" · gradient checkpointing" if plan.gradient_checkpointing else ""),
        "",
        "parameters",
        f"  {FAMILIES[plan.arch].denoiser:<16}{plan.params_unet / 1e6:10.1f} M",
        f"  text encoders   {plan.params_text_encoders / 1e6:10.1f} M",
        f"  VAE             {plan.params_vae / 1e6:10.1f} M",
        f"  trainable       {plan.params_trainable / 1e6:10.3f} M",
        "",
        "memory per GPU (training loop)",
        f"  weights         {gib(plan.weights)}",
        f"  gradients       {gib(plan.grads)}",
        f"  optimizer       {gib(plan.optimizer)}",
        f"  activations     {gib(plan.activations)}",
        f"  grads+act peak  {gib(plan.backward_peak)}  (backward frees activations as gradients appear)",
        f"  cached data     {gib(plan.data_cache)}",
        f"  CUDA overhead   {gib(plan.overhead)}",
        f"  total           {gib(plan.total)} of {plan.capacity / GB:.0f} GiB → "
        + ("fits" if plan.fits else "DOES NOT FIT"),
        "",
        "time and cost",
        f"  forward         {plan.fwd_tflop_per_sample:8.2f} TFLOP per sample",
        f"  per step        {plan.seconds_per_step:8.2f} s ({plan.bound}-bound: GPU work "
        f"{plan.compute_seconds_per_step:.2f} s at {plan.mfu:.0%} MFU, host launches {plan.host_seconds_per_step:.2f} s;"
        f" {plan.effective_mfu:.0%} of datasheet peak)",
        f"  {plan.steps} steps: {plan.hours * 60:.0f} min"
        if plan.hours < 1
        else f"  {plan.steps} steps: {plan.hours:.1f} h ({plan.hours / 24:.1f} days)",
        f"  cost            ${plan.usd:,.2f} at ${plan.usd_per_gpu_hour:.2f}/GPU-hour × {plan.num_gpus} GPU(s)",
    ]
    lines += [f"note: {n}" for n in plan.notes]
    return "\n".join(lines)
