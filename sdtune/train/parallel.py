"""FSDP2 for full fine-tunes: functions applied to a plain UNet; the model code never knows it is sharded.

``train.parallelism=fsdp`` (dreambooth, full): every ``BasicTransformerBlock`` and ``ResnetBlock2D`` becomes its
own FSDP unit, then the root. Each rank holds 1/N of the weights, gradients and optimizer state; a unit's
full weights exist only while it runs (all-gather before, reduce-scatter of its gradients after). That is
what lets an SDXL UNet (2.6 G parameters: 10.3 GB fp32 weights + 20.6 GB AdamW state + 10.3 GB grads) train
on 40 GB cards. DDP stays the default: it is simpler and faster when a replica fits (every LoRA, SD 1.5).
An EMA (diffusers ``EMAModel``) built from the sharded parameters holds shards too (DTensors, 1/N each);
:func:`full_tensors` and :func:`load_full_tensors` move such shards to and from whole tensors for checkpoints.

Works on CPU with gloo (the tests), on GPUs with NCCL.
"""

from __future__ import annotations

import contextlib

import torch


def apply_fsdp(unet: torch.nn.Module) -> torch.nn.Module:
    """Shard ``unet`` in place over the default process group (call after gradient checkpointing is set,
    before the optimizer is built: its parameters become DTensor shards)."""
    from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from torch.distributed.fsdp import fully_shard

    for module in unet.modules():  # the repeated blocks: the UNet's, or SD3's joint blocks
        if isinstance(module, BasicTransformerBlock | ResnetBlock2D | JointTransformerBlock):
            fully_shard(module)
    fully_shard(unet)  # the rest (conv_in/out, time embedding, norms) as the root unit
    return unet


def unsharded_class(model: torch.nn.Module) -> type:
    """The model's own class (``fully_shard`` swaps it for a subclass that mixes in ``FSDPModule``)."""
    from torch.distributed.fsdp import FSDPModule

    return next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))


def is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def maybe_no_sync(model, accelerator, sync: bool):
    """Skip the gradient all-reduce / reduce-scatter on micro-batches that are not the last."""
    if sync:
        return contextlib.nullcontext()
    if is_fsdp(model):
        return _fsdp_no_sync(model)
    return accelerator.no_sync(model)


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm(model, params, accelerator, max_norm: float) -> torch.Tensor:
    """Clip and return the global grad norm (FSDP: over all shards, as a plain tensor)."""
    if is_fsdp(model):
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    return accelerator.clip_grad_norm_(params, max_norm)


def full_tensors(tensors, keep: bool) -> list[torch.Tensor]:
    """Whole CPU copies of ``tensors`` where ``keep`` (else []): an FSDP shard (a DTensor) is all-gathered
    one tensor at a time, so no rank ever holds more than one whole tensor beyond its shards (a collective:
    every rank calls it). Plain tensors are copied as they are."""
    from torch.distributed.tensor import DTensor

    whole = []
    for tensor in tensors:
        full = tensor.full_tensor() if isinstance(tensor, DTensor) else tensor.detach()
        if keep:
            whole.append(full.to("cpu", copy=True))
    return whole


@torch.no_grad()
def load_full_tensors(targets: list[torch.Tensor], values: list[torch.Tensor]) -> None:
    """Copy whole tensors (as :func:`full_tensors` gave them) into ``targets``; a target that is an FSDP
    shard takes only its own slice of the value, the slice FSDP gives this rank (no communication: every
    rank holds the whole value)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if len(targets) != len(values):
        raise ValueError(f"{len(values)} tensors for {len(targets)} places")
    for target, value in zip(targets, values, strict=True):
        value = value.to(target.device)
        if isinstance(target, DTensor):
            value = distribute_tensor(value, target.device_mesh, target.placements, src_data_rank=None)
        target.copy_(value)


def full_state_dict(model) -> dict[str, torch.Tensor]:
    """The whole model's weights on CPU: gathered to rank 0 under FSDP (a collective; others get {})."""
    if is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in model.state_dict().items()}
