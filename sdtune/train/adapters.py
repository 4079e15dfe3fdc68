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


def add_text_encoder_lora(
    encoders: dict[str, torch.nn.Module], tc: TrainConfig, device, dtype
) -> list[torch.nn.Parameter]:
    """``train_text_encoder``: a LoRA on each text encoder (``text_encoder_target_modules``), the frozen
    weights on ``device`` in ``dtype``; returns the adapters' parameters (cast them with :func:`to_fp32`)."""
    params: list[torch.nn.Parameter] = []
    for encoder in encoders.values():
        encoder.to(device, dtype)
        params += add_lora(encoder, tc, tc.text_encoder_target_modules, use_dora=tc.use_dora)
    return params


def lora_groups(tc: TrainConfig, params: list, te_params: list) -> list[dict]:
    """Optimizer groups: the denoiser's LoRA at ``learning_rate``, the text encoders' at ``text_encoder_lr``."""
    groups = [{"params": params, "lr": tc.learning_rate}]
    if te_params:
        groups.append({"params": te_params, "lr": tc.text_encoder_lr or tc.learning_rate})
    return groups
