"""Training data: read a stage directory, shard it by rank, and encode it ONCE (VAE latents, text embeddings).

Every recipe trains on a :class:`EncodedData`: the latent distribution of each image (mean and std, so each
step still draws a fresh latent sample) and the text conditioning of each caption, all on the training device.
The VAE and text encoders are then no longer needed during the loop.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from sdtune.config import RunConfig
from sdtune.errors import DatasetError
from sdtune.manifest import Record, read_manifest
from sdtune.models.text import tokenize


def train_records(cfg: RunConfig, data_dir: Path, split: str = "train") -> list[Record]:
    records = [r for r in read_manifest(data_dir) if r.split == split]
    if not records:
        raise DatasetError(f"{data_dir}: no records with split {split!r} in the manifest")
    return records


def caption_of(record: Record, cfg: RunConfig) -> str:
    """The record's caption, or the configured template ("a photo of sks person") when it has none."""
    return record.caption or cfg.format_prompt(cfg.caption.template)


def shard(items: list, rank: int, world_size: int) -> list:
    """This rank's share: every ``world_size``-th item, wrapping around so no rank is ever empty."""
    n = max(len(items), world_size)
    return [items[i % len(items)] for i in range(rank, n, world_size)]


def load_image(path: Path, resolution: int) -> torch.Tensor:
    """RGB image → ``[3, res, res]`` float tensor in [-1, 1] (resize shorter side, centre crop)."""
    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (resolution, resolution):
            scale = resolution / min(im.size)
            w, h = max(resolution, round(im.width * scale)), max(resolution, round(im.height * scale))
            im = im.resize((w, h), Image.Resampling.LANCZOS)
            left, top = (w - resolution) // 2, (h - resolution) // 2
            im = im.crop((left, top, left + resolution, top + resolution))
        arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


@dataclass
class EncodedData:
    """Cached inputs for the denoising loss; row ``i`` of every tensor belongs to image ``i``."""

    latent_mean: torch.Tensor  # [N, 4, h, w], unscaled
    latent_std: torch.Tensor
    prompt_embeds: torch.Tensor  # [N, 77, D]
    pooled_embeds: torch.Tensor | None = None  # SDXL: [N, D2]
    time_ids: torch.Tensor | None = None  # SDXL: [N, 6]

    def __len__(self) -> int:
        return self.latent_mean.shape[0]


@torch.no_grad()
def encode_images(
    vae, pixels: torch.Tensor, device, batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """VAE latent distribution (mean, std) of ``pixels``. The VAE runs in fp32 (SDXL's VAE overflows in fp16)."""
    vae.to(device)  # loaded in fp32; never cast to half here
    means, stds = [], []
    for start in range(0, pixels.shape[0], batch_size):
        dist = vae.encode(pixels[start : start + batch_size].to(device)).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
    return torch.cat(means), torch.cat(stds)


def encode_image_files(vae, paths: list[Path], resolution: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The latent distribution (mean, std) of each image file, at ``resolution`` (fp32 VAE)."""
    return encode_images(vae, torch.stack([load_image(p, resolution) for p in paths]), device)


def tokenize_prompts(parts, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Token ids for each CLIP text encoder: ``{"ids": …}`` plus ``"ids_2"`` for SDXL and SD3."""
    out = {"ids": tokenize(parts.tokenizer, prompts)}
    if parts.tokenizer_2 is not None:
        out["ids_2"] = tokenize(parts.tokenizer_2, prompts)
    return out


def text_conditioning(parts, ids: dict[str, torch.Tensor], resolution: int) -> dict[str, torch.Tensor]:
    """Text conditioning from token ids (differentiable: textual inversion calls it inside the loop).

    SD 1.x/2.x: the last hidden state. SDXL: both encoders' penultimate states concatenated, the pooled
    projection of the second, and the size/crop ``time_ids``. SD3 (as its pipeline's ``encode_prompt``): the
    two CLIP penultimate states concatenated, zero-padded to the T5 width and followed by the T5 states
    (``ids["t5_embeds"]``, computed once: T5 stays frozen), and both CLIP projections as the pooled embedding.
    """
    input_ids = ids["ids"]
    if not parts.is_sdxl and not parts.is_sd3:
        return {"prompt_embeds": parts.text_encoder(input_ids)[0]}
    out_1 = parts.text_encoder(input_ids, output_hidden_states=True)
    out_2 = parts.text_encoder_2(ids["ids_2"], output_hidden_states=True)
    embeds = torch.cat([out_1.hidden_states[-2], out_2.hidden_states[-2]], dim=-1)
    if parts.is_sd3:
        t5 = ids["t5_embeds"]
        embeds = torch.nn.functional.pad(embeds, (0, t5.shape[-1] - embeds.shape[-1]))
        return {
            "prompt_embeds": torch.cat([embeds, t5.to(embeds.dtype)], dim=-2),
            "pooled_embeds": torch.cat([out_1[0], out_2[0]], dim=-1),
        }
    return {
        "prompt_embeds": embeds,
        "pooled_embeds": out_2.text_embeds,
        "time_ids": size_ids(resolution, input_ids.device).repeat(input_ids.shape[0], 1),
    }


_SIZE_IDS: dict[tuple[int, str], torch.Tensor] = {}


def size_ids(resolution: int, device) -> torch.Tensor:
    """SDXL's size/crop conditioning ``[1, 6]`` (original h, w, crop top, left, target h, w; images arrive
    already cropped to the training size), built once per device: a fresh ``torch.tensor(…, device=cuda)``
    in every step would be a host-to-device copy each time (textual inversion encodes every step)."""
    key = (resolution, str(device))
    if key not in _SIZE_IDS:
        _SIZE_IDS[key] = torch.tensor(
            [[resolution, resolution, 0, 0, resolution, resolution]], dtype=torch.float32, device=device
        )
    return _SIZE_IDS[key]


def to_device(tensor: torch.Tensor, device) -> torch.Tensor:
    """``tensor`` on ``device`` without making the host wait: on CUDA it is copied from pinned memory
    asynchronously (a pageable copy blocks the host until the transfer is done); on the CPU it is returned as is."""
    device = torch.device(device)
    if device.type != "cuda" or tensor.device == device:
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


@torch.no_grad()
def encode_prompts(
    parts, prompts: list[str], device, resolution: int, max_sequence_length: int = 77
) -> dict[str, torch.Tensor]:
    """Text conditioning for ``prompts``, computed once (fp32; SD3: T5 at ``max_sequence_length`` tokens)."""
    for encoder in (parts.text_encoder, parts.text_encoder_2):
        if encoder is not None:
            encoder.to(device)
    ids = {k: v.to(device) for k, v in tokenize_prompts(parts, prompts).items()}
    if parts.is_sd3:
        ids["t5_embeds"] = t5_embeddings(parts, prompts, device, max_sequence_length)
    return {k: v.float() for k, v in text_conditioning(parts, ids, resolution).items()}


def encode_records(
    parts, records: list[Record], data_dir: Path, cfg: RunConfig, device, dtype: torch.dtype = torch.float32
) -> EncodedData:
    """Encode this rank's records once and return the cache (tensors on ``device`` in ``dtype``)."""
    paths = [Path(data_dir) / r.file for r in records]
    return encode_files(parts, paths, [caption_of(r, cfg) for r in records], cfg, device, dtype)


def encode_files(
    parts, paths: list[Path], captions: list[str], cfg: RunConfig, device, dtype: torch.dtype = torch.float32
) -> EncodedData:
    """Encode images and their captions once (VAE in fp32; tensors stored on ``device`` in ``dtype``)."""
    res = cfg.preprocess.resolution
    mean, std = encode_image_files(parts.vae, paths, res, device)
    text = encode_prompts(parts, captions, device, res, cfg.train.max_sequence_length)
    return EncodedData(
        latent_mean=mean.to(dtype),
        latent_std=std.to(dtype),
        prompt_embeds=text["prompt_embeds"].to(dtype),
        pooled_embeds=text["pooled_embeds"].to(dtype) if "pooled_embeds" in text else None,
        time_ids=text["time_ids"].to(dtype) if "time_ids" in text else None,
    )


@torch.no_grad()
def t5_embeddings(parts, prompts: list[str], device, max_sequence_length: int = 77) -> torch.Tensor:
    """SD3's T5 states of ``prompts`` (as its pipeline computes them; zeros when the model has no T5), once:
    T5 is frozen in every method, so no recipe runs it in the loop."""
    if parts.text_encoder_3 is None:
        width = parts.transformer.config.joint_attention_dim
        return torch.zeros(len(prompts), max_sequence_length, width, device=device)
    ids = parts.tokenizer_3(
        prompts,
        padding="max_length",
        max_length=max_sequence_length,
        truncation=True,
        add_special_tokens=True,
        return_tensors="pt",
    ).input_ids
    return parts.text_encoder_3.to(device)(ids.to(device))[0].float()


def index_batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless batches of indices into ``n`` items: a fresh permutation per epoch, seeded."""
    buffer: list[int] = []
    while True:
        while len(buffer) < batch_size:
            buffer.extend(torch.randperm(n, generator=generator).tolist())
        batch, buffer = buffer[:batch_size], buffer[batch_size:]
        yield torch.tensor(batch, dtype=torch.long)


class EpochSampler:
    """Endless batches of indices into ``n`` items, a fresh seeded permutation per epoch, resumable.

    Its position is two integers (``epoch``, ``index`` into that epoch's order), which is what a checkpoint
    stores: each epoch's order is a pure function of (seed, epoch), so a resumed run continues mid-epoch
    with exactly the batches the uninterrupted run would have drawn, and replays nothing.
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.epoch, self.index = 0, 0
        self._order: torch.Tensor | None = None

    def order(self, epoch: int) -> torch.Tensor:
        return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))

    def __iter__(self) -> EpochSampler:
        return self

    def __next__(self) -> torch.Tensor:
        batch: list[int] = []
        while len(batch) < self.batch_size:  # a batch may straddle two epochs
            if self._order is None:
                self._order = self.order(self.epoch)
            take = self._order[self.index : self.index + self.batch_size - len(batch)].tolist()
            batch += take
            self.index += len(take)
            if self.index >= self.n:
                self.epoch, self.index, self._order = self.epoch + 1, 0, None
        return torch.tensor(batch, dtype=torch.long)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index, "n": self.n, "seed": self.seed}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["n"] != self.n:
            from sdtune.errors import CheckpointError

            raise CheckpointError(
                f"checkpoint was taken on {state['n']} items per rank, this run has {self.n}"
            )
        self.epoch, self.index, self.seed, self._order = state["epoch"], state["index"], state["seed"], None


class GlobalDraw:
    """Random numbers for the GLOBAL batch, of which each rank keeps its own slice.

    Every rank seeds the same generator and draws for all ``world × batch`` samples, so sample ``j`` of
    rank ``r`` gets the noise and timestep of global slot ``r·batch + j`` whatever the layout: 2 ranks ×
    batch 1 and 1 rank × batch 2 train on identical inputs (the DDP equivalence test relies on it). The
    extra draws cost nothing next to a UNet step.
    """

    def __init__(self, generator: torch.Generator, rank: int, world: int):
        self.generator, self.rank, self.world = generator, rank, world

    def _slice(self, full: torch.Tensor, n: int) -> torch.Tensor:
        return full[self.rank * n : (self.rank + 1) * n]

    def randn(self, shape, device, dtype=torch.float32) -> torch.Tensor:
        n = shape[0]
        full = torch.randn((n * self.world, *shape[1:]), generator=self.generator, device=device, dtype=dtype)
        return self._slice(full, n)

    def rand(self, n: int, device) -> torch.Tensor:
        full = torch.rand((n * self.world,), generator=self.generator, device=device)
        return self._slice(full, n)

    def randint(self, high: int, n: int, device) -> torch.Tensor:
        full = torch.randint(
            0, high, (n * self.world,), generator=self.generator, device=device, dtype=torch.long
        )
        return self._slice(full, n)


def scaled_latents(
    vae_config, mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | GlobalDraw
) -> torch.Tensor:
    """Sample from the cached latent distribution and scale it the way the UNet expects."""
    if isinstance(generator, GlobalDraw):
        eps = generator.randn(mean.shape, mean.device, mean.dtype)
    else:
        eps = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    sample = mean + std * eps
    shift = getattr(vae_config, "shift_factor", None) or 0.0
    return (sample - shift) * vae_config.scaling_factor


def sample_latents(vae_config, data, idx: torch.Tensor, generator) -> torch.Tensor:
    """:func:`scaled_latents` of rows ``idx`` of a cache (anything with ``latent_mean``/``latent_std``)."""
    return scaled_latents(vae_config, data.latent_mean[idx], data.latent_std[idx], generator)


@dataclass
class TokenizedData:
    """Cached latents and token ids, for recipes whose text encoders train (so they run every step)."""

    latent_mean: torch.Tensor
    latent_std: torch.Tensor
    token_ids: dict[str, torch.Tensor]  # {"ids": …} plus "ids_2" for SDXL/SD3, "t5_embeds" for SD3
    vae_config: Any  # how the latents are scaled for the denoiser

    def __len__(self) -> int:
        return self.latent_mean.shape[0]

    def ids(self, idx: torch.Tensor) -> dict[str, torch.Tensor]:
        return {k: v[idx] for k, v in self.token_ids.items()}


def encode_tokenized(
    parts, paths: list[Path], captions: list[str], resolution: int, device, max_sequence_length: int = 77
) -> TokenizedData:
    """Latent distributions (fp32) of the images and token ids of the captions, on ``device`` (SD3: with the
    frozen T5's states of the captions, ``t5_embeds``, computed here once)."""
    mean, std = encode_image_files(parts.vae, paths, resolution, device)
    token_ids = {k: v.to(device) for k, v in tokenize_prompts(parts, captions).items()}
    if parts.is_sd3:
        token_ids["t5_embeds"] = t5_embeddings(parts, captions, device, max_sequence_length)
    return TokenizedData(mean, std, token_ids, parts.vae.config)


def unet_conditioning(data: EncodedData, idx: torch.Tensor) -> dict:
    """Keyword arguments for the UNet call for the batch ``idx``."""
    return unet_kwargs(cached_text(data, idx))


def unet_kwargs(text: dict, dtype: torch.dtype | None = None) -> dict:
    """UNet keyword arguments from :func:`text_conditioning`'s output (SDXL: plus the added conditioning),
    cast to ``dtype`` when given (text encoders that train run in fp32 next to a half-precision UNet)."""

    def cast(x: torch.Tensor) -> torch.Tensor:
        return x if dtype is None else x.to(dtype)

    kwargs: dict = {"encoder_hidden_states": cast(text["prompt_embeds"])}
    if text.get("pooled_embeds") is not None:
        kwargs["added_cond_kwargs"] = {
            "text_embeds": cast(text["pooled_embeds"]),
            "time_ids": cast(text["time_ids"]),
        }
    return kwargs


def predict(
    parts, model, noisy: torch.Tensor, t: torch.Tensor, text: dict, dtype: torch.dtype
) -> torch.Tensor:
    """The denoiser's output for ``noisy`` at timesteps ``t`` under the text conditioning ``text``
    (:func:`text_conditioning`): the UNet's noise/velocity (SD 1.x/2.x/SDXL) or the SD3 transformer's flow."""
    if parts.is_sd3:
        return model(
            hidden_states=noisy.to(dtype),
            timestep=t,
            encoder_hidden_states=text["prompt_embeds"].to(dtype),
            pooled_projections=text["pooled_embeds"].to(dtype),
            return_dict=False,
        )[0]
    return model(noisy.to(dtype), t, **unet_kwargs(text, dtype)).sample


def cached_text(data: EncodedData, idx: torch.Tensor) -> dict:
    """The cached text conditioning of the batch ``idx`` (:func:`text_conditioning`'s keys)."""
    return {
        "prompt_embeds": data.prompt_embeds[idx],
        "pooled_embeds": data.pooled_embeds[idx] if data.pooled_embeds is not None else None,
        "time_ids": data.time_ids[idx] if data.time_ids is not None else None,
    }


def cat_text(a: dict, b: dict) -> dict:
    """Two batches' text conditioning (:func:`text_conditioning`, :func:`cached_text`) as one batch."""
    return {k: None if v is None else torch.cat([v, b[k]]) for k, v in a.items()}
