"""A diffusers SD 1.x / 2.x / SDXL pipeline → one ``model.safetensors`` in the original (CompVis/LDM / SGM)
layout: what AUTOMATIC1111, ComfyUI and ``…Pipeline.from_single_file(path, config=<diffusers folder>)`` load.

Keys: ``model.diffusion_model.*`` (UNet: ``input_blocks``/``middle_block``/``output_blocks``),
``first_stage_model.*`` (VAE: ``encoder.down.N.block.M``, ``mid.attn_1.q`` as 1×1 convs …) and the text
encoder: SD 1.x ``cond_stage_model.transformer.*`` (the CLIP text model, unchanged), SD 2.x
``cond_stage_model.model.*`` (OpenCLIP: ``transformer.resblocks.N`` with q/k/v fused into ``in_proj``), SDXL
``conditioner.embedders.0.transformer.*`` (CLIP-L) and ``conditioner.embedders.1.model.*`` (OpenCLIP-bigG, its
``text_projection`` transposed); SDXL's size/crop embedding is ``label_emb.0``. The
renaming follows diffusers' own ``scripts/convert_diffusers_to_original_stable_diffusion.py``, generalised from
SD 1.5's fixed 4 blocks × 2 layers to any ``block_out_channels`` / ``layers_per_block`` (read from the model
configs), so the tiny test models convert too. SD 2.x writes the text encoder's layers as diffusers holds them
(23 of OpenCLIP-H's 24 blocks: SD 2.x conditions on the penultimate one).
"""

from __future__ import annotations

from pathlib import Path

import torch

SINGLE_FILE = "model.safetensors"

_UNET_TOP = [
    ("time_embed.0.", "time_embedding.linear_1."),
    ("time_embed.2.", "time_embedding.linear_2."),
    ("label_emb.0.0.", "add_embedding.linear_1."),  # SDXL: time ids + pooled text embedding
    ("label_emb.0.2.", "add_embedding.linear_2."),
    ("input_blocks.0.0.", "conv_in."),
    ("out.0.", "conv_norm_out."),
    ("out.2.", "conv_out."),
]
_UNET_RESNET = [
    ("in_layers.0", "norm1"),
    ("in_layers.2", "conv1"),
    ("out_layers.0", "norm2"),
    ("out_layers.3", "conv2"),
    ("emb_layers.1", "time_emb_proj"),
    ("skip_connection", "conv_shortcut"),
]
_VAE_ATTN = [
    ("norm.", "group_norm."),
    ("q.", "to_q."),
    ("k.", "to_k."),
    ("v.", "to_v."),
    ("proj_out.", "to_out.0."),
]


def _unet_layer_map(keys: list[str], n_blocks: int, layers: int) -> list[tuple[str, str]]:
    """(sd prefix, diffusers prefix) for the blocks of a UNet with ``n_blocks`` levels × ``layers`` layers."""
    out = []
    per = layers + 1  # resnets per level in input_blocks (+ the downsample slot) and in output_blocks
    for i in range(n_blocks):
        for j in range(layers):
            out.append((f"input_blocks.{per * i + j + 1}.0.", f"down_blocks.{i}.resnets.{j}."))
            out.append((f"input_blocks.{per * i + j + 1}.1.", f"down_blocks.{i}.attentions.{j}."))
        for j in range(per):
            out.append((f"output_blocks.{per * i + j}.0.", f"up_blocks.{i}.resnets.{j}."))
            out.append((f"output_blocks.{per * i + j}.1.", f"up_blocks.{i}.attentions.{j}."))
        if i < n_blocks - 1:
            out.append((f"input_blocks.{per * (i + 1)}.0.op.", f"down_blocks.{i}.downsamplers.0.conv."))
            has_attn = any(k.startswith(f"up_blocks.{i}.attentions.") for k in keys)
            out.append(
                (f"output_blocks.{per * i + layers}.{2 if has_attn else 1}.", f"up_blocks.{i}.upsamplers.0.")
            )
    out.append(("middle_block.1.", "mid_block.attentions.0."))
    out += [(f"middle_block.{2 * j}.", f"mid_block.resnets.{j}.") for j in range(2)]
    return out


def convert_unet(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    layers = config.layers_per_block
    if not isinstance(layers, int):
        raise ValueError("single-file export needs the same layers_per_block in every block")
    layer_map = _unet_layer_map(list(state), len(config.block_out_channels), layers)
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in _UNET_TOP:
            if new.startswith(hf):
                new = sd + new[len(hf) :]
        if "resnets" in key:
            for sd, hf in _UNET_RESNET:
                new = new.replace(hf, sd)
        for sd, hf in layer_map:
            new = new.replace(hf, sd)
        out[new] = value
    return out


def convert_vae(state: dict[str, torch.Tensor], config) -> dict[str, torch.Tensor]:
    n = len(config.block_out_channels)
    mapping = [
        ("nin_shortcut", "conv_shortcut"),
        ("norm_out", "conv_norm_out"),
        ("mid.attn_1.", "mid_block.attentions.0."),
    ]
    for i in range(n):
        for j in range(config.layers_per_block):
            mapping.append((f"encoder.down.{i}.block.{j}.", f"encoder.down_blocks.{i}.resnets.{j}."))
        for j in range(config.layers_per_block + 1):
            mapping.append((f"decoder.up.{n - 1 - i}.block.{j}.", f"decoder.up_blocks.{i}.resnets.{j}."))
        if i < n - 1:
            mapping.append((f"encoder.down.{i}.downsample.", f"encoder.down_blocks.{i}.downsamplers.0."))
            mapping.append((f"decoder.up.{n - 1 - i}.upsample.", f"decoder.up_blocks.{i}.upsamplers.0."))
    mapping += [(f"mid.block_{j + 1}.", f"mid_block.resnets.{j}.") for j in range(2)]
    out = {}
    for key, value in state.items():
        new = key
        for sd, hf in mapping:
            new = new.replace(hf, sd)
        if "mid.attn_1." in new:
            head, _, tail = new.partition("mid.attn_1.")
            for sd, hf in _VAE_ATTN:
                if tail.startswith(hf):
                    tail = sd + tail[len(hf) :]
                    break
            new = head + "mid.attn_1." + tail
            if new.endswith(("q.weight", "k.weight", "v.weight", "proj_out.weight")) and value.ndim == 2:
                value = value.reshape(*value.shape, 1, 1)  # linear → 1×1 conv, as the LDM VAE stores it
        out[new] = value
    return out


_OPEN_CLIP = [
    ("embeddings.token_embedding.weight", "token_embedding.weight"),
    ("embeddings.position_embedding.weight", "positional_embedding"),
    ("final_layer_norm.", "ln_final."),
    ("encoder.layers.", "transformer.resblocks."),
    (".layer_norm1.", ".ln_1."),
    (".layer_norm2.", ".ln_2."),
    (".mlp.fc1.", ".mlp.c_fc."),
    (".mlp.fc2.", ".mlp.c_proj."),
    (".self_attn.out_proj.", ".attn.out_proj."),
]


def convert_open_clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model → OpenCLIP's keys (q/k/v stacked into ``attn.in_proj_weight/bias``)."""
    state = {k.removeprefix("text_model."): v for k, v in state.items()}
    out = {}
    for key, value in state.items():
        if ".self_attn." in key and not key.split(".self_attn.")[1].startswith("out_proj"):
            prefix, _, tail = key.partition(".self_attn.")
            if not tail.startswith("q_proj"):
                continue  # q, k and v go in together, from the q key
            kind = tail.rpartition(".")[2]  # weight / bias
            key = f"{prefix}.attn.in_proj_{kind}"
            value = torch.cat([state[f"{prefix}.self_attn.{p}_proj.{kind}"] for p in "qkv"])
        for hf, oc in _OPEN_CLIP:
            key = key.replace(hf, oc)
        out[key] = value
    return out


def layout(pipe) -> str:
    """``ldm-sd1``, ``ldm-sd2`` (OpenCLIP text encoder; linear transformer projections) or ``sgm-sdxl``."""
    if getattr(pipe, "text_encoder_2", None) is not None:
        return "sgm-sdxl"
    return "ldm-sd2" if pipe.unet.config.use_linear_projection else "ldm-sd1"


def _cpu(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", torch.float32) for k, v in module.state_dict().items()}


def _clip_keys(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # transformers ≥ 5.6 flattened CLIPTextModel (no ``text_model.`` level); the original layout has it.
    return {prefix + (k if k.startswith("text_model.") else f"text_model.{k}"): v for k, v in state.items()}


def original_state_dict(pipe) -> dict[str, torch.Tensor]:
    """UNet + VAE + text encoder(s) of an SD 1.x/2.x/SDXL pipeline under the original checkpoint's keys (fp32,
    CPU)."""
    kind = layout(pipe)
    out = {
        f"model.diffusion_model.{k}": v for k, v in convert_unet(_cpu(pipe.unet), pipe.unet.config).items()
    }
    out.update({f"first_stage_model.{k}": v for k, v in convert_vae(_cpu(pipe.vae), pipe.vae.config).items()})
    text = _cpu(pipe.text_encoder)
    if kind == "ldm-sd1":
        out.update(_clip_keys(text, "cond_stage_model.transformer."))
    elif kind == "ldm-sd2":
        out.update({f"cond_stage_model.model.{k}": v for k, v in convert_open_clip(text).items()})
    else:
        out.update(_clip_keys(text, "conditioner.embedders.0.transformer."))
        big = _cpu(pipe.text_encoder_2)
        projection = big.pop("text_projection.weight")
        big = convert_open_clip(big)
        big["text_projection"] = projection.T.contiguous()  # OpenCLIP multiplies from the right
        out.update({f"conditioner.embedders.1.model.{k}": v for k, v in big.items()})
    return out


CONFIG_METADATA = "sdtune_diffusers_config"  # the pipeline's config files, so the file loads offline


def save_single_file(pipe, path: Path) -> Path:
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in original_state_dict(pipe).items()}
    metadata = {"format": "pt", "sdtune_layout": layout(pipe), CONFIG_METADATA: pipeline_config_files(pipe)}
    save_file(tensors, str(path), metadata=metadata)
    return path


def pipeline_config_files(pipe) -> str:
    """model_index.json, each component's config and the tokenizer files, as JSON ``{relative path: text}``:
    what ``from_single_file(config=folder)`` reads instead of asking the hub for the architecture's."""
    import json
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pipe.save_config(root)
        for name in ("unet", "vae", "scheduler"):  # diffusers configs
            getattr(pipe, name).save_config(root / name)
        for name in ("text_encoder", "text_encoder_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).config.save_pretrained(root / name)  # a transformers config
        for name in ("tokenizer", "tokenizer_2"):
            if getattr(pipe, name, None) is not None:
                getattr(pipe, name).save_pretrained(root / name)
        files = {
            p.relative_to(root).as_posix(): p.read_text(encoding="utf-8")
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.suffix in {".json", ".txt"}
        }
    return json.dumps(files, sort_keys=True)
