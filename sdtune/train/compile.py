"""``train.compile``: how the denoiser (the UNet, or SD3's transformer) runs inside the training step.

- ``none``: eager PyTorch (the default).
- ``default``: ``torch.compile`` of the whole denoiser, ``fullgraph=True`` (a graph break is an error, not a
  silent slow path). Forward and backward become one compiled graph each (AOTAutograd); the first step
  pays the compile time (tens of seconds on a CPU, minutes for SDXL on a GPU).
- ``regional``: ``torch.compile`` of each repeated block only (regional compilation, as diffusers'
  ``compile_repeated_blocks``). Same-shaped blocks share one compiled graph, so compile time stays in
  seconds; the code between blocks (the ResNet blocks' convolutions and norms) stays eager. The UNet's
  regions are its ``Transformer2DModel`` attention blocks, not the ``BasicTransformerBlock`` inside them that
  diffusers lists in ``_repeated_blocks``: compiling those with inductor (torch 2.13, diffusers 0.42.1)
  gave LoRA gradients 10–30 % off the eager ones at batch 1 (exact at batch 2, and exact with the
  ``aot_eager`` backend), while the enclosing block compiles exactly; ``tests/train/test_compile.py``
  guards it. Other models: diffusers' ``_repeated_blocks``, else the items of ``transformer_blocks`` (SD3).
- ``graphs``: CUDA only: ``default`` with ``mode="reduce-overhead"``, i.e. the compiled forward and backward
  replayed as CUDA graphs (one launch instead of thousands; the step's shapes are static, which the cached
  latents guarantee). On a CPU it is a one-line config error. The optimizer becomes graph-safe too: fused
  AdamW with ``capturable=True`` and its learning rates as device tensors the LR schedule writes into
  (:func:`.runtime.adamw_with_tensor_lr`), so ``optimizer.step()`` reads no host value and can be captured.

The text encoders that run in every step (textual inversion, pivotal tuning, ``train_text_encoder``) are
compiled the same way (``regional``: their ``CLIPEncoderLayer`` blocks): eager, their hundreds of kernels per
forward would be launched one by one beside a compiled or graphed UNet (the seed job's CLIP-L and bigG
forward is ~680 kernels, :mod:`.plan`).

Under FSDP (``train.parallelism=fsdp``) every mode compiles the forward of each sharded unit (the blocks
:func:`.parallel.apply_fsdp` shards): FSDP2's all-gather and reduce-scatter hooks run around the units and
cannot be traced (dynamo skips them, a graph break that ``fullgraph`` refuses), so they stay eager. On 2 CPU
ranks the saved UNet equals the eager run's to 1.2e-7 after 3 SGD steps (inductor). ``graphs`` under FSDP
captures one CUDA graph per unit: unmeasured.

``SDTUNE_COMPILE_BACKEND`` (debugging, tests): a ``torch.compile`` backend other than inductor, e.g.
``aot_eager`` (the same graph capture without code generation).

The compile wraps the module in place (``nn.Module.compile``), so parameter names, ``state_dict``, peft's
LoRA export and checkpoints are the same as eager. The rest of the step (noise and timestep draws, the
loss bookkeeping, the optimizer) stays eager and free of host syncs (see :mod:`.session`).
"""

from __future__ import annotations

import os

import torch

from sdtune.errors import ConfigError

from .parallel import is_fsdp

MODES = ("none", "default", "regional", "graphs")


def check_mode(mode: str, device: torch.device) -> None:
    """Refuse, before any work, a mode this device cannot run."""
    if mode not in MODES:
        raise ConfigError(f"train.compile={mode!r}: expected one of {', '.join(MODES)}")
    if mode == "graphs" and torch.device(device).type != "cuda":
        raise ConfigError(
            f"train.compile=graphs needs a CUDA GPU (it replays the step as CUDA graphs); this run is on "
            f"{torch.device(device).type}: use train.compile=default or regional"
        )


def compile_in_place(model: torch.nn.Module, mode: str, *, backend: str | None = None) -> torch.nn.Module:
    """``model`` compiled in place as ``mode`` says (see the module docstring); returned for chaining.
    ``backend``: a ``torch.compile`` backend other than inductor (tests use ``aot_eager``). Compiling is
    lazy: the first forward traces, so adapters added afterwards (peft LoRA) are part of the graph."""
    if mode == "none" or is_compiled(model):
        return model
    # Static shapes: a step's shapes never change (cached latents, whole batches), and regional blocks at
    # several resolutions would otherwise turn "automatically dynamic" after the second one — which inductor
    # (torch 2.13, CPU) failed to compile on the medium bench UNet ("cannot determine truth value of
    # Relational"). Each block shape gets its own graph instead.
    kwargs: dict = {"fullgraph": True, "dynamic": False}
    install_output_hooks(model)
    if mode == "graphs":
        kwargs["mode"] = "reduce-overhead"
    backend = backend or os.environ.get("SDTUNE_COMPILE_BACKEND")
    if backend:
        kwargs["backend"] = backend
    if is_fsdp(model):
        # FSDP2's all-gather / reduce-scatter hooks cannot be traced (dynamo skips them: a graph break), so
        # each sharded unit's own forward is compiled and the hooks around it stay eager.
        for unit in [m for m in model.modules() if is_fsdp(m) and m is not model]:
            unit.forward = torch.compile(unit.forward, **kwargs)
    elif mode == "regional":
        blocks = repeated_blocks(model)
        if not blocks:
            raise ConfigError(
                f"train.compile=regional: {type(model).__name__} has no repeated blocks to compile; "
                "use train.compile=default"
            )
        for block in blocks:
            block.compile(**kwargs)
    else:
        model.compile(**kwargs)
    model._sdtune_compile = mode
    return model


def install_output_hooks(model: torch.nn.Module) -> None:
    """transformers installs a model's output-capturing hooks (what ``output_hidden_states`` reads, as SDXL's
    conditioning asks) on its first call, under a threading lock dynamo cannot trace: a graph break, which
    ``fullgraph`` refuses (``Unsupported context manager``). Install them before the first, compiled call."""
    try:
        from transformers import PreTrainedModel
        from transformers.utils.output_capturing import maybe_install_capturing_hooks
    except ImportError:  # no transformers, or one that installs no hooks lazily
        return
    for module in model.modules():
        if isinstance(module, PreTrainedModel):
            maybe_install_capturing_hooks(module)


def begin_step(mode: str) -> None:
    """Call before each optimizer step's first forward. Under ``graphs`` it tells CUDA-graph trees that a new
    step starts, so that everything until the next call (the text encoders, the denoiser, every
    micro-batch) is one generation whose outputs stay valid. Left to itself, the trees start a new
    generation at any compiled call made while no backward is pending, and free the previous call's
    outputs: pivotal tuning's frozen-embedding phase encodes without gradients, so the second encoder's
    call would free the first one's hidden states before they are concatenated (and the denoiser's call
    SDXL's pooled embedding), an "accessing tensor output of CUDAGraphs that has been overwritten" error."""
    if mode == "graphs":
        torch.compiler.cudagraph_mark_step_begin()


def is_compiled(model: torch.nn.Module) -> bool:
    return getattr(model, "_sdtune_compile", None) is not None


# Region classes chosen here instead of diffusers' `_repeated_blocks` (see the module docstring for why).
REGIONS = {
    "UNet2DConditionModel": ["Transformer2DModel"],
    # Text encoders that run in every step (textual inversion, pivotal, a trained encoder): their layers.
    "CLIPTextModel": ["CLIPEncoderLayer"],
    "CLIPTextModelWithProjection": ["CLIPEncoderLayer"],
}


def repeated_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The blocks regional compilation compiles: those of the classes in :data:`REGIONS` for the model's
    class, else of the classes diffusers lists in its ``_repeated_blocks``, else the items of its
    ``transformer_blocks`` list (SD3)."""
    names = set(REGIONS.get(type(model).__name__) or getattr(model, "_repeated_blocks", None) or [])
    if names:
        return [m for m in model.modules() if type(m).__name__ in names]
    blocks = getattr(model, "transformer_blocks", None)
    return list(blocks) if isinstance(blocks, torch.nn.ModuleList) else []
