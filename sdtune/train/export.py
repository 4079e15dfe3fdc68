"""Formats other tools load: kohya/A1111/ComfyUI LoRA and A1111 textual-inversion embeddings.

kohya-format LoRA (what sd-scripts writes, and what AUTOMATIC1111, ComfyUI and diffusers'
``load_lora_weights`` read): one flat safetensors file with, per adapted layer,

- ``lora_unet_<module path, dots → underscores>.lora_down.weight``  (A, ``[rank, in]``)
- ``lora_unet_<…>.lora_up.weight``                                 (B, ``[out, rank]``)
- ``lora_unet_<…>.alpha``                                          (scalar; scale = alpha / rank)

and ``lora_te_`` / ``lora_te1_`` / ``lora_te2_`` for text-encoder layers. The module paths are the diffusers
UNet's (sd-scripts trains SD 1.x on that UNet; ComfyUI and diffusers also map them for SDXL).
"""

from __future__ import annotations

from pathlib import Path

import torch

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, component: str = "unet", sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """peft LoRA weights of one model (``…to_q.lora_A.weight`` keys, as ``get_peft_model_state_dict`` gives
    them) → kohya keys, with an ``alpha`` entry per module. ``component``: unet, text_encoder, text_encoder_2."""
    prefix = KOHYA_PREFIX[component]
    if component == "text_encoder" and not sdxl:
        prefix = "lora_te_"  # SD 1.x/2.x spelling; te1 is SDXL's
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for peft_part, kohya_part in (
            (".lora_A.weight", ".lora_down.weight"),
            (".lora_B.weight", ".lora_up.weight"),
        ):
            if key.endswith(peft_part):
                module = key[: -len(peft_part)]
                for strip in ("base_model.model.", "unet.", "text_encoder.", "text_encoder_2."):
                    module = module.removeprefix(strip)
                name = prefix + module.replace(".", "_")
                out[name + kohya_part] = value.detach().to("cpu", torch.float16).contiguous()
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
                break
        else:
            raise ValueError(f"unexpected LoRA key {key!r} (DoRA and bias LoRA are not exported)")
    return out


def save_kohya_lora(
    parts: dict[str, tuple[dict[str, torch.Tensor], float]],
    path: Path,
    metadata: dict[str, str] | None = None,
    sdxl: bool = False,
) -> Path:
    """``parts``: component name → (peft state dict, alpha). Writes one kohya-format safetensors file."""
    from safetensors.torch import save_file

    merged: dict[str, torch.Tensor] = {}
    for component, (state_dict, alpha) in parts.items():
        merged.update(peft_to_kohya(state_dict, alpha, component, sdxl=sdxl))
    save_file(merged, str(path), metadata={"format": "pt", **(metadata or {})})
    return path


def save_a1111_embedding(vectors: torch.Tensor, path: Path, key: str = "emb_params") -> Path:
    """A1111 textual-inversion file: ``{"emb_params": [n_vectors, dim]}``; the file name is the token."""
    from safetensors.torch import save_file

    save_file({key: vectors.detach().to("cpu", torch.float32).contiguous()}, str(path))
    return path
