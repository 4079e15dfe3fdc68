"""Formats other tools load: kohya/A1111/ComfyUI LoRA and A1111 textual-inversion embeddings.

kohya-format LoRA (what sd-scripts writes, and what AUTOMATIC1111, ComfyUI and diffusers'
``load_lora_weights`` read): one flat safetensors file with, per adapted layer,

- ``lora_unet_<module path, dots → underscores>.lora_down.weight``  (A, ``[rank, in]``)
- ``lora_unet_<…>.lora_up.weight``                                 (B, ``[out, rank]``)
- ``lora_unet_<…>.alpha``                                          (scalar; scale = alpha / rank)

and ``lora_te_`` (SD 1.x/2.x) / ``lora_te1_`` + ``lora_te2_`` (SDXL) for text-encoder layers, always with
the ``text_model_`` level (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``): that is the only
spelling ComfyUI (comfy/lora.py) and A1111 (extensions-builtin/Lora) look up, whatever transformers version
wrote the weights (5.x dropped the level from CLIPTextModel's module names).

UNet module paths: SD 1.x/2.x use the diffusers UNet's (``down_blocks_0_attentions_0_…``, what sd-scripts
trains those on); SDXL uses the original (SGM) UNet's (``input_blocks_4_1_…``), what sd-scripts trains SDXL
on and looks up; ComfyUI, A1111 and diffusers map both.

Metadata: ``ss_base_model_version`` takes kohya's values (``sd_v1``, ``sd_v2``, ``sdxl_base_v1-0``): A1111
files a LoRA under SDXL only when it starts with ``sdxl_``, and under SD 2.x only with ``ss_v2: "True"``.
"""

from __future__ import annotations

from pathlib import Path

import torch

KOHYA_PREFIX = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
BASE_MODEL_VERSION = {"sd15": "sd_v1", "sd2": "sd_v2", "sdxl": "sdxl_base_v1-0"}


def peft_to_kohya(
    state_dict: dict[str, torch.Tensor], alpha: float, component: str = "unet", sdxl: bool = False
) -> dict[str, torch.Tensor]:
    """peft LoRA weights of one model (``…to_q.lora_A.weight`` keys, as ``get_peft_model_state_dict`` gives
    them) → kohya keys, with an ``alpha`` entry per module. ``component``: unet, text_encoder, text_encoder_2."""
    prefix = KOHYA_PREFIX[component]
    if component == "text_encoder" and not sdxl:
        prefix = "lora_te_"  # SD 1.x/2.x spelling; te1 is SDXL's
    modules = {key: _module_path(key, component) for key in state_dict}
    if component == "unet" and sdxl:
        paths = sorted(set(modules.values()))
        sgm = dict(zip(paths, _sgm_paths(paths), strict=True))
        modules = {key: sgm[path] for key, path in modules.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for peft_part, kohya_part in (
            (".lora_A.weight", ".lora_down.weight"),
            (".lora_B.weight", ".lora_up.weight"),
        ):
            if key.endswith(peft_part):
                name = prefix + modules[key].replace(".", "_")
                out[name + kohya_part] = value.detach().to("cpu", torch.float16).contiguous()
                out[name + ".alpha"] = torch.tensor(float(alpha), dtype=torch.float16)
                break
        else:
            raise ValueError(f"unexpected LoRA key {key!r} (DoRA and bias LoRA are not exported)")
    return out


def _module_path(key: str, component: str) -> str:
    """The adapted module's path in its model (``encoder.layers.0.self_attn.q_proj``) from a peft key."""
    module = key
    for suffix in (".lora_A.weight", ".lora_B.weight"):
        module = module.removesuffix(suffix)
    for strip in ("base_model.model.", "unet.", "text_encoder.", "text_encoder_2."):
        module = module.removeprefix(strip)
    if component != "unet" and not module.startswith("text_model."):
        module = f"text_model.{module}"  # CLIPTextModel's level in transformers < 5.6 and in every tool
    return module


def _sgm_paths(paths: list[str]) -> list[str]:
    """Diffusers UNet module paths → the original (SGM) UNet's, as the single-file export renames them.
    The block layout comes from the paths: levels = highest block index + 1, layers = attentions per level."""
    from types import SimpleNamespace

    from sdtune.train.single_file import convert_unet

    def highest(part: str) -> int:
        return max((int(p.split(".")[1]) for p in paths if p.startswith(part)), default=0)

    levels = 1 + max(highest("down_blocks."), highest("up_blocks."))
    per_level = [int(p.split(".")[3]) for p in paths if p.startswith("down_blocks.") and ".attentions." in p]
    layers = 1 + max(per_level, default=0)
    config = SimpleNamespace(layers_per_block=layers, block_out_channels=[0] * levels)
    renamed = convert_unet({f"{p}.weight": None for p in paths}, config)
    return [key.removesuffix(".weight") for key in renamed]


def kohya_metadata(metadata: dict[str, str] | None) -> dict[str, str]:
    """kohya's metadata values for an ``ss_base_model_version`` given as ``model.arch``."""
    meta = {"format": "pt", "ss_network_module": "networks.lora", **(metadata or {})}
    arch = meta.get("ss_base_model_version")
    if arch in BASE_MODEL_VERSION:
        meta["ss_base_model_version"] = BASE_MODEL_VERSION[arch]
        meta["ss_v2"] = str(arch == "sd2")
    return meta


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
    save_file(merged, str(path), metadata=kohya_metadata(metadata))
    return path


def save_a1111_embedding(vectors: torch.Tensor, path: Path, key: str = "emb_params") -> Path:
    """A1111 textual-inversion file: ``{"emb_params": [n_vectors, dim]}``; the file name is the token."""
    from safetensors.torch import save_file

    save_file({key: vectors.detach().to("cpu", torch.float32).contiguous()}, str(path))
    return path
