"""Tiny, seeded, randomly initialised Stable Diffusion pipelines for tests and the CPU demo.

``build_tiny("sd15", out)`` writes a diffusers folder (UNet, VAE, CLIP text encoder, tokenizer, scheduler,
no safety checker) that ``StableDiffusionPipeline.from_pretrained(out)`` loads offline; ``"sd15-inpaint"`` the
same with a 9-channel UNet (latents + mask + masked-image latents) for ``StableDiffusionInpaintPipeline``;
``"sd2"`` an SD 2.x-style one (v-prediction scheduler, linear-projection attention with per-block head dims,
GELU text encoder as in OpenCLIP ViT-H); ``"sdxl"`` a ``StableDiffusionXLPipeline`` folder with two text
encoders, ``"sdxl-inpaint"`` the same with a 9-channel UNet for ``StableDiffusionXLInpaintPipeline``;
``"sd3"`` a ``StableDiffusion3Pipeline`` folder (2-layer MMDiT, 16-channel VAE with shift/scaling
factors, flow-matching Euler scheduler, two CLIP encoders with projections and a tiny T5 encoder whose
``T5Tokenizer`` is a Unigram vocabulary over the same word list). Sizes follow diffusers' own
``get_dummy_components`` (~1.7 M parameters, 64 px images in about a second on a CPU).

``build_tiny("sd15", out, pretrained=True)`` copies instead the pre-trained tiny SD 1.x shipped in
:data:`PRETRAINED_V_DIR` (v-prediction, zero terminal SNR; built by :mod:`sdtune.models.pretrain`, see its
``MODEL_CARD.md``): a real model of a procedural domain of coloured shapes and toy robots, on which fine-tuning
can be seen to learn a subject (``objective="epsilon"``: the earlier ε-prediction build, :data:`PRETRAINED_DIR`);
``"sd15-inpaint"`` with ``pretrained=True`` is the same model with a 9-channel UNet whose extra input
channels start at zero (SD's own inpainting init), so it begins as the text-to-image model.

The tokenizer is a small BPE trained with ``tokenizers`` on a fixed word list (common prompt words and the
trigger ``sks``), saved as ``vocab.json`` + ``merges.txt`` so ``CLIPTokenizer.from_pretrained`` reads it.
The same seed gives byte-identical weights.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

ARCHS = ("sd15", "sd15-inpaint", "sd2", "sdxl", "sdxl-inpaint", "sd3")

# Every word a prompt in tests, presets or the demo may use; characters outside still tokenize (per letter).
_WORD_TEXT = """
a an the of in on at with and or by for from to my this that is photo photograph picture image painting
drawing sketch render illustration portrait closeup close up shot style art artwork digital oil watercolor
sks ohwx zwx robot toy dog cat person man woman boy girl child face car house tree flower bird
horse city street forest beach mountain sea ocean river lake sky sun moon night day snow rain desert
garden park room kitchen table chair book cup bottle hat shirt red green blue yellow white black orange
purple pink brown gray grey gold silver small big large tiny cute old new happy sitting standing running
walking jumping flying wearing holding looking front side back top view high quality detailed sharp
blurry lowres bad best masterpiece cinematic lighting studio background simple plain colorful bright dark
wood metal plastic glass stone space astronaut rocket wall floor window door road bridge building castle
circle square triangle shape
"""
WORDS = _WORD_TEXT.split()

SPECIAL = ["<|startoftext|>", "<|endoftext|>"]
MAX_LENGTH = 77


TINY_MARKER = ".sdtune-tiny-model"


def _refuse_foreign_out_dir(out_dir: Path) -> None:
    """Only an empty folder or an earlier tiny build is replaced: a mistyped ``--out`` is never emptied."""
    from sdtune.errors import ConfigError

    if not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    if any(out_dir.iterdir()) and not (out_dir / TINY_MARKER).is_file():
        raise ConfigError(f"--out {out_dir} is not empty and not a tiny model; use a new or empty folder")


PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "assets" / "tiny-sd15-pretrained"
# The v-prediction, zero-terminal-SNR build is the default: it meets every gate of its card (the ε build misses
# the two conditioning gates) and keeps the unmasked picture when inpainting; fine-tuning moves its held-out
# losses about half as much, its samples as much or more (docs/evaluation.md, "The v-prediction base").
PRETRAINED_V_DIR = PRETRAINED_DIR.with_name("tiny-sd15-pretrained-v")
PRETRAINED_DIRS = {"epsilon": PRETRAINED_DIR, "v": PRETRAINED_V_DIR}
DEFAULT_OBJECTIVE = "v"
PRETRAINED_ARCHS = ("sd15", "sd15-inpaint")


def build_tiny(
    arch: str, out_dir: Path, seed: int = 0, pretrained: bool = False, objective: str | None = None
) -> Path:
    """Write a tiny ``arch`` (one of :data:`ARCHS`) diffusers pipeline folder to ``out_dir`` and return it.

    ``pretrained``: the shipped pre-trained weights (``sd15`` and ``sd15-inpaint`` only; ``seed`` unused), the
    v-prediction base or, with ``objective="epsilon"``, the ε-prediction one (:data:`PRETRAINED_DIRS`)."""
    from sdtune.errors import ConfigError

    if arch not in ARCHS:
        raise ConfigError(f"tiny model: unknown arch {arch!r} (expected one of {', '.join(ARCHS)})")
    if objective is not None and not pretrained:
        raise ConfigError(f"tiny model: objective {objective!r} picks a pre-trained base: add --pretrained")
    if pretrained:
        if arch not in PRETRAINED_ARCHS:
            raise ConfigError(
                f"tiny model: no pre-trained weights for {arch!r} (only {', '.join(PRETRAINED_ARCHS)})"
            )
        objective = objective or DEFAULT_OBJECTIVE
        if objective not in PRETRAINED_DIRS:
            raise ConfigError(
                f"tiny model: unknown objective {objective!r} (expected one of {', '.join(PRETRAINED_DIRS)})"
            )
        return _copy_pretrained(arch, Path(out_dir), PRETRAINED_DIRS[objective])
    import torch

    out_dir = Path(out_dir)
    if out_dir.exists():
        _refuse_foreign_out_dir(out_dir)
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    (out_dir / TINY_MARKER).write_text("written by `sdtune models tiny`; replaced on the next build\n")
    tok_dir = out_dir / "tokenizer"
    tokenizer = write_tokenizer(tok_dir)
    # Each component is seeded on its own: the same seed gives the same bytes whatever ran before.
    with torch.random.fork_rng(devices=[]):
        if arch in ("sdxl", "sdxl-inpaint"):
            pipe = _sdxl(tokenizer, seed, inpaint=arch == "sdxl-inpaint")
        elif arch == "sd3":
            pipe = _sd3(tokenizer, _t5_tokenizer(), seed)
        else:
            pipe = sd15_pipeline(tokenizer, seed, variant=arch)
    pipe.save_pretrained(out_dir, safe_serialization=True)
    if arch in ("sdxl", "sdxl-inpaint", "sd3"):
        shutil.rmtree(out_dir / "tokenizer_2", ignore_errors=True)
        shutil.copytree(tok_dir, out_dir / "tokenizer_2")
    (out_dir / "sdtune_tiny.json").write_text(
        json.dumps({"arch": arch, "seed": seed}) + "\n", encoding="utf-8"
    )
    return out_dir


def _copy_pretrained(arch: str, out_dir: Path, source: Path) -> Path:
    if not (source / "model_index.json").is_file():
        from sdtune.errors import ConfigError

        raise ConfigError(f"pre-trained tiny model missing at {source} (see its make target in the Makefile)")
    if out_dir.exists():
        _refuse_foreign_out_dir(out_dir)
        shutil.rmtree(out_dir)
    shutil.copytree(source, out_dir)
    (out_dir / TINY_MARKER).write_text("written by `sdtune models tiny`; replaced on the next build\n")
    if arch == "sd15-inpaint":
        _widen_to_inpaint(out_dir)
    return out_dir


def _widen_to_inpaint(model_dir: Path) -> None:
    """Turn the text-to-image folder into an inpainting one: conv_in takes latents + mask + masked-image
    latents (9 channels); the 5 new input channels get zero weights, so the model starts as it was."""
    import torch
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, local_files_only=True)
    old = pipe.unet
    unet = UNet2DConditionModel.from_config({**old.config, "in_channels": 9})
    state = old.state_dict()
    weight = state["conv_in.weight"]
    state["conv_in.weight"] = torch.cat([weight, weight.new_zeros(weight.shape[0], 5, *weight.shape[2:])], 1)
    unet.load_state_dict(state)
    inpaint = StableDiffusionInpaintPipeline(
        unet=unet.eval(),
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler", "model_index.json"):
        path = model_dir / name
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    inpaint.save_pretrained(model_dir, safe_serialization=True)
    meta = json.loads((model_dir / "sdtune_tiny.json").read_text(encoding="utf-8"))
    meta["arch"] = "sd15-inpaint"
    (model_dir / "sdtune_tiny.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def write_tokenizer(tok_dir: Path):
    """Write ``vocab.json`` + ``merges.txt`` for a BPE learned on :data:`WORDS`, then load it as a CLIPTokenizer.

    The BPE is learned here (greedy most-frequent pair, ties broken alphabetically) rather than with
    ``tokenizers``' trainer, whose tie-breaking is not deterministic across processes.
    """
    from transformers import CLIPTokenizer

    tok_dir.mkdir(parents=True, exist_ok=True)
    vocab_list, merges = _learn_bpe(sorted(set(WORDS)))
    vocab = {token: i for i, token in enumerate(SPECIAL + vocab_list)}
    (tok_dir / "vocab.json").write_text(json.dumps(vocab, sort_keys=True), encoding="utf-8")
    (tok_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    tokenizer = CLIPTokenizer.from_pretrained(tok_dir, model_max_length=MAX_LENGTH, pad_token=SPECIAL[1])
    tokenizer.save_pretrained(tok_dir)
    return tokenizer


def _learn_bpe(words: list[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """Merge pairs until every word is one token. Returns (tokens in id order, merges in rank order)."""
    alphabet = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()<>[]_/&+\"") | set("".join(words)))
    tokens = alphabet + [ch + "</w>" for ch in alphabet]
    seqs = [[*w[:-1], w[-1] + "</w>"] for w in words]
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in seqs:
            for pair in zip(seq, seq[1:], strict=False):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return tokens, merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        tokens.append(best[0] + best[1])
        for seq in seqs:
            i = 0
            while i < len(seq) - 1:
                if (seq[i], seq[i + 1]) == best:
                    seq[i : i + 2] = [best[0] + best[1]]
                i += 1


def clip_text_config(vocab_size: int, **overrides):
    """The tiny CLIP text encoder's config (hidden 32, 2 layers, the tiny tokenizer's special ids);
    ``overrides`` replace any field (a projection, a wider encoder for the benchmark's medium model)."""
    from transformers import CLIPTextConfig

    fields = {
        "bos_token_id": 0,
        "eos_token_id": 1,
        "pad_token_id": 1,
        "hidden_size": 32,
        "intermediate_size": 37,
        "layer_norm_eps": 1e-05,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": vocab_size,
        "max_position_embeddings": MAX_LENGTH,
    }
    return CLIPTextConfig(**{**fields, **overrides})


def small_vae(seed: int, block_out_channels: tuple[int, ...] = (32, 64), **overrides):
    """A small ``AutoencoderKL`` (seeded with ``seed + 1``): one encoder and one decoder block per entry of
    ``block_out_channels``, 4 latent channels; ``overrides`` replace any other field."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed + 1)
    blocks = len(block_out_channels)
    fields = {
        "block_out_channels": list(block_out_channels),
        "in_channels": 3,
        "out_channels": 3,
        "down_block_types": ["DownEncoderBlock2D"] * blocks,
        "up_block_types": ["UpDecoderBlock2D"] * blocks,
        "latent_channels": 4,
        "sample_size": 64,
    }
    return AutoencoderKL(**{**fields, **overrides})


def _unet(seed: int, inpaint: bool, **extra):
    """The tiny two-level UNet (4 latent channels; 9 input channels for inpainting); ``extra``: the family's."""
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=32,
        in_channels=9 if inpaint else 4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=32,
        **extra,
    )


def sd15_pipeline(tokenizer, seed: int, variant: str = "sd15"):
    import torch
    from diffusers import (
        DDIMScheduler,
        PNDMScheduler,
        StableDiffusionInpaintPipeline,
        StableDiffusionPipeline,
    )
    from transformers import CLIPTextModel

    sd2 = variant == "sd2"
    extra: dict = {"attention_head_dim": (2, 4), "use_linear_projection": True} if sd2 else {}
    unet = _unet(seed, variant == "sd15-inpaint", cross_attention_dim=32, **extra)
    vae = small_vae(seed)
    torch.manual_seed(seed + 2)
    text_encoder = CLIPTextModel(clip_text_config(len(tokenizer), **({"hidden_act": "gelu"} if sd2 else {})))
    if sd2:  # SD 2.x 768: v-prediction
        scheduler = DDIMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
            prediction_type="v_prediction",
        )
    else:
        scheduler = PNDMScheduler(
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            skip_prk_steps=True,
            steps_offset=1,
        )
        # SD 1.5's config says so; without the key DDIMScheduler.from_config would clip latents to ±1.
        scheduler.register_to_config(clip_sample=False)
    cls = StableDiffusionInpaintPipeline if variant == "sd15-inpaint" else StableDiffusionPipeline
    return cls(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def _clip_l_and_g(tokenizer, seed: int, first_projected: bool):
    """The CLIP-L and CLIP-G stand-ins of SDXL and SD3 (hidden 32 each; seeded ``seed + 2``, ``seed + 3``). The
    second has a 32-wide projection (the pooled embedding); so has the first with ``first_projected`` (SD3
    pools both)."""
    import torch
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed + 2)
    first = (
        CLIPTextModelWithProjection(clip_text_config(len(tokenizer), projection_dim=32))
        if first_projected
        else CLIPTextModel(clip_text_config(len(tokenizer)))
    )
    torch.manual_seed(seed + 3)
    return first, CLIPTextModelWithProjection(clip_text_config(len(tokenizer), projection_dim=32))


def _sdxl(tokenizer, seed: int, inpaint: bool = False):
    from diffusers import (
        EulerDiscreteScheduler,
        StableDiffusionXLInpaintPipeline,
        StableDiffusionXLPipeline,
    )

    unet = _unet(
        seed,
        inpaint,
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * 8 (size/crop ids) + 32 (pooled projection)
        cross_attention_dim=64,  # 32 + 32 (both encoders' hidden states, concatenated)
    )
    vae = small_vae(seed)
    text_encoder, text_encoder_2 = _clip_l_and_g(tokenizer, seed, first_projected=False)
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        steps_offset=1,
        timestep_spacing="leading",
    )
    cls = StableDiffusionXLInpaintPipeline if inpaint else StableDiffusionXLPipeline
    return cls(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        scheduler=scheduler,
        force_zeros_for_empty_prompt=True,
    )


def _t5_tokenizer():
    """A ``T5Tokenizer`` over a Unigram vocabulary: pad/eos/unk, every word of :data:`WORDS` as one piece,
    then single characters (so any text tokenizes). Built from the list, no file or download."""
    from transformers import T5Tokenizer

    chars = sorted(set("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-:;()<>[]_/&+\"") | set("".join(WORDS)))
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)]
    vocab += [("\u2581" + w, -1.0) for w in sorted(set(WORDS))]
    vocab += [("\u2581", -5.0)] + [(c, -10.0) for c in chars]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=MAX_LENGTH)


def _sd3(tokenizer, tokenizer_3, seed: int):
    """MMDiT with 2 joint blocks: CLIP-L/G stand-ins (hidden 32 each, concatenated to 64 = the T5 width =
    ``joint_attention_dim``; projections 32 + 32 = ``pooled_projection_dim``)."""
    import torch
    from diffusers import (
        FlowMatchEulerDiscreteScheduler,
        SD3Transformer2DModel,
        StableDiffusion3Pipeline,
    )
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=32,
        patch_size=2,
        in_channels=16,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=4,
        joint_attention_dim=64,
        caption_projection_dim=32,  # = heads × head dim
        pooled_projection_dim=64,
        out_channels=16,
        pos_embed_max_size=32,  # up to 32 × 32 patches: 128 px images
    )
    vae = small_vae(
        seed,
        latent_channels=16,
        use_quant_conv=False,
        use_post_quant_conv=False,
        shift_factor=0.0609,  # SD3's values
        scaling_factor=1.5305,
    )
    text_encoder, text_encoder_2 = _clip_l_and_g(tokenizer, seed, first_projected=True)
    torch.manual_seed(seed + 4)
    text_encoder_3 = T5EncoderModel(
        T5Config(
            vocab_size=len(tokenizer_3),
            d_model=64,
            d_kv=16,
            d_ff=64,
            num_layers=2,
            num_heads=4,
            relative_attention_num_buckets=8,
            pad_token_id=0,
            eos_token_id=1,
        )
    )
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    return StableDiffusion3Pipeline(
        transformer=transformer.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        text_encoder_2=text_encoder_2.eval(),
        text_encoder_3=text_encoder_3.eval(),
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        tokenizer_3=tokenizer_3,
        scheduler=scheduler,
    )
