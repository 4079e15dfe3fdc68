"""LoRA adapters on a plain model (UNet, SD3 transformer, text encoder): the peft configuration every recipe uses."""

from __future__ import annotations

import torch

from sdtune.config import TrainConfig


def add_lora(
    model: torch.nn.Module, tc: TrainConfig, target_modules: list[str], *, use_dora: bool = False
) -> list[torch.nn.Parameter]:
    """A peft LoRA (``train.rank``, ``alpha`` (default = rank), gaussian init from the global torch RNG) on
    ``target_modules``; returns its parameters, the only ones that train. Cast them with :func:`to_fp32`
    once every adapter is in place.

    peft's input cast is turned off (plain LoRA): over a half-precision base it would cast each adapted
    layer's input to the fp32 adapter's dtype, only for autocast to cast it straight back for the matmul —
    two casts per layer and two more in backward, same numbers (docs/performance.md). The trainer runs every
    forward of a half-precision base under autocast, which does the one cast needed (of the adapter weights,
    cached for the step). DoRA keeps the cast: its weight-norm maths mixes the base and adapter dtypes."""
    from peft import LoraConfig

    model.add_adapter(
        LoraConfig(
            r=tc.rank,
            lora_alpha=tc.alpha or tc.rank,
            init_lora_weights="gaussian",
            target_modules=target_modules,
            use_dora=use_dora,
        )
    )
    if not use_dora:
        set_input_casting(model, False)
    return [p for p in model.parameters() if p.requires_grad]


def set_input_casting(model: torch.nn.Module, enabled: bool) -> None:
    """peft's cast of each adapted layer's input to the adapter weights' dtype, on or off (every layer)."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.cast_input_dtype_enabled = enabled


def to_fp32(params: list[torch.nn.Parameter]) -> None:
    """Trainable weights in fp32 over a half-precision frozen base (autocast does the half-precision maths)."""
    for p in params:
        p.data = p.data.float()
