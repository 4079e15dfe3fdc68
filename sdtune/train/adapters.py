"""LoRA adapters on a plain model (UNet, SD3 transformer, text encoder): the peft configuration every recipe uses."""

from __future__ import annotations

import torch

from sdtune.config import TrainConfig


def add_lora(
    model: torch.nn.Module, tc: TrainConfig, target_modules: list[str], *, use_dora: bool = False
) -> list[torch.nn.Parameter]:
    """A peft LoRA (``train.rank``, ``alpha`` (default = rank), gaussian init from the global torch RNG) on
    ``target_modules``; returns its parameters, the only ones that train. Cast them with :func:`to_fp32`
    once every adapter is in place."""
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
    return [p for p in model.parameters() if p.requires_grad]


def to_fp32(params: list[torch.nn.Parameter]) -> None:
    """Trainable weights in fp32 over a half-precision frozen base (autocast does the half-precision maths)."""
    for p in params:
        p.data = p.data.float()
