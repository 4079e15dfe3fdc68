"""The kohya/A1111 LoRA file is named the way kohya sd-scripts, ComfyUI and A1111 look keys up.

Checked on the REAL SD 1.5 / SD 2 / SDXL module names (configs only, built on the meta device), against each
tool's own rules restated here (not through diffusers' loader, which accepts spellings the others do not):

- ComfyUI (comfy/lora.py): text encoders only as ``lora_te_text_model_encoder_layers_{i}_{part}`` (SD 1/2),
  ``lora_te1_…`` / ``lora_te2_…`` (SDXL), ``part`` one of six CLIP projections; UNet as ``lora_unet_`` + a
  diffusers UNet module path or an original (``diffusion_model``) module path, dots → underscores.
- A1111 (extensions-builtin/Lora): diffusers UNet names are converted to original ones with fixed rules
  (``down_blocks_{b}_attentions_{j}`` → ``input_blocks_{1 + 3b + j}_1``, …) and must then name an original
  module; otherwise ``lora_unet`` → ``diffusion_model`` must. ``lora_te_text_model_…`` →
  ``transformer_text_model_…``. SDXL only when ``ss_base_model_version`` starts with ``sdxl_``; SD 2 only with
  ``ss_v2 == "True"``.
- kohya sd-scripts: SD 1/2 UNet by diffusers names, SDXL UNet by original names; text encoders as above.
"""

from __future__ import annotations

import re

import pytest
import torch

from sdtune.train.export import kohya_metadata, peft_to_kohya
from sdtune.train.plan import HUB
from sdtune.train.single_file import convert_unet

CLIP_PARTS = {
    "mlp_fc1",
    "mlp_fc2",
    "self_attn_k_proj",
    "self_attn_q_proj",
    "self_attn_v_proj",
    "self_attn_out_proj",
}
UNET_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TE_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def _meta_unet(config: dict):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def _meta_encoder(config: dict):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    keys = {k: v for k, v in config.items() if k in CLIPTextConfig().to_dict()}
    cls = (
        CLIPTextModelWithProjection
        if config.get("architectures") == ["CLIPTextModelWithProjection"]
        else CLIPTextModel
    )
    with torch.device("meta"):
        return cls(CLIPTextConfig(**keys))


def _lora_state(model, targets: list[str]) -> dict[str, torch.Tensor]:
    """peft's state-dict keys for LoRA on ``targets``, with small CPU tensors (the base stays on meta)."""
    suffixes = tuple(f".{t}" for t in targets)
    state = {}
    for name, module in model.named_modules():
        if name.endswith(suffixes) and isinstance(module, torch.nn.Linear | torch.nn.Conv2d):
            state[f"base_model.model.{name}.lora_A.weight"] = torch.zeros(4, 1)
            state[f"base_model.model.{name}.lora_B.weight"] = torch.zeros(1, 4)
    assert state, targets
    return state


def _modules(kohya: dict[str, torch.Tensor], prefix: str) -> set[str]:
    return {k.split(".")[0] for k in kohya if k.startswith(prefix)}


def _a1111_unet_name(name: str) -> str:
    """A1111's diffusers → original conversion of a ``lora_unet_`` name (its regexes, restated)."""
    rules = [
        (r"lora_unet_down_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_input_blocks_{1 + int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"),
        (r"lora_unet_mid_block_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_middle_block_{1 if m[1] == 'attentions' else int(m[2]) * 2}_{m[3]}"),
        (r"lora_unet_up_blocks_(\d+)_(attentions|resnets)_(\d+)_(.+)",
         lambda m: f"diffusion_model_output_blocks_{int(m[1]) * 3 + int(m[3])}_{1 if m[2] == 'attentions' else 0}_{m[4]}"),
    ]  # fmt: skip
    for pattern, convert in rules:
        if match := re.fullmatch(pattern, name):
            return convert(match)
    return name


@pytest.mark.parametrize("arch", ["sd15", "sd2", "sdxl"])
def test_kohya_names_are_what_comfyui_a1111_and_kohya_look_up(arch):
    unet_config, encoder_configs = HUB[arch]
    unet = _meta_unet(unet_config)
    sdxl = arch == "sdxl"

    kohya = peft_to_kohya(_lora_state(unet, UNET_TARGETS), 4.0, "unet", sdxl=sdxl)
    diffusers_names = {
        "lora_unet_" + n.replace(".", "_") for n, m in unet.named_modules() if isinstance(m, torch.nn.Linear)
    }
    original_keys = convert_unet({k: None for k in unet.state_dict()}, unet.config)
    original_names = {"diffusion_model_" + k.removesuffix(".weight").replace(".", "_") for k in original_keys}
    exported = _modules(kohya, "lora_unet_")
    assert len(exported) == len(_lora_state(unet, UNET_TARGETS)) // 2
    for name in exported:
        as_original = "diffusion_model_" + name.removeprefix("lora_unet_")
        if sdxl:  # sd-scripts' SDXL UNet is the original one
            assert as_original in original_names, name
        else:  # sd-scripts' SD 1/2 UNet is diffusers'
            assert name in diffusers_names, name
        # ComfyUI maps both spellings; A1111 converts diffusers names, else takes original ones as they are
        assert name in diffusers_names or as_original in original_names, name
        a1111 = _a1111_unet_name(name)
        assert a1111 in original_names or as_original in original_names, (name, a1111)

    prefixes = ["lora_te1_", "lora_te2_"] if sdxl else ["lora_te_"]
    for component, config, prefix in zip(
        ("text_encoder", "text_encoder_2"), encoder_configs, prefixes, strict=False
    ):
        encoder = _meta_encoder(config)
        state = _lora_state(encoder, TE_TARGETS)
        names = _modules(peft_to_kohya(state, 4.0, component, sdxl=sdxl), prefix)
        layers = config["num_hidden_layers"]
        comfy = {
            f"{prefix}text_model_encoder_layers_{i}_{part}" for i in range(layers) for part in CLIP_PARTS
        }
        assert names == comfy  # every exported text-encoder module, and each one ComfyUI maps
        if prefix in ("lora_te_", "lora_te1_"):  # A1111: → transformer_text_model_… of the original CLIP
            hf_names = {n.replace(".", "_") for n, _ in encoder.named_modules()}
            for name in names:
                a1111 = name.replace(prefix, "", 1)
                assert a1111 in hf_names or a1111.removeprefix("text_model_") in hf_names, name


def test_kohya_metadata_tells_a1111_the_model_family():
    assert kohya_metadata({"ss_base_model_version": "sdxl"})["ss_base_model_version"].startswith("sdxl_")
    sd2 = kohya_metadata({"ss_base_model_version": "sd2"})
    assert sd2["ss_v2"] == "True" and sd2["ss_base_model_version"] == "sd_v2"
    sd15 = kohya_metadata({"ss_base_model_version": "sd15"})
    assert sd15["ss_v2"] == "False" and sd15["ss_base_model_version"] == "sd_v1"
