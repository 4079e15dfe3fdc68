"""Latents and text embeddings cached on disk in shards, for catalogues too large to hold in memory.

Each rank encodes ITS records (:func:`sdtune.train.data.shard`) in chunks of ``train.cache_shard_size`` and
writes ``<out>/cache/latents-NNNNN.safetensors`` (``NNNNN = chunk · world + rank``, so ranks never write the
same file and no collective runs while caching). A shard carries a key (hash of its records' content hashes
and captions, the resolution and the base model) in its metadata: a rerun or a resume reuses the shards
that match and re-encodes only the others. During training rows are read through safetensors' memory map,
one batch at a time, so host memory stays flat whatever the catalogue size.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from sdtune.config import RunConfig

from . import data as D

FIELDS = ("latent_mean", "latent_std", "prompt_embeds", "pooled_embeds", "time_ids")


def shard_path(cache_dir: Path, chunk: int, rank: int, world: int) -> Path:
    return Path(cache_dir) / f"latents-{chunk * world + rank:05d}.safetensors"


def _key(records, cfg: RunConfig, source: str) -> str:
    spec = {
        "items": [(r.file, r.sha256, D.caption_of(r, cfg)) for r in records],
        "res": cfg.preprocess.resolution,
        "model": source,
        "arch": cfg.model.arch,
    }
    return hashlib.sha256(json.dumps(spec).encode()).hexdigest()


def _stored_key(path: Path) -> str | None:
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as fh:
            return (fh.metadata() or {}).get("key")
    except Exception:  # torn or foreign file: re-encode it
        return None


def build(
    parts, records, data_dir: Path, cfg: RunConfig, cache_dir: Path, rank: int, world: int, device
) -> tuple[list[Path], int]:
    """Encode this rank's records into shards (reusing matching ones). Returns (shard paths, shards written)."""
    from safetensors.torch import save_file

    size = cfg.train.cache_shard_size
    cache_dir.mkdir(parents=True, exist_ok=True)
    paths, written = [], 0
    for chunk, start in enumerate(range(0, len(records), size)):
        mine = records[start : start + size]
        path = shard_path(cache_dir, chunk, rank, world)
        key = _key(mine, cfg, parts.source)
        paths.append(path)
        if path.is_file() and _stored_key(path) == key:
            continue
        enc = D.encode_records(parts, mine, data_dir, cfg, device, torch.float32)
        tensors = {
            f: getattr(enc, f).detach().to("cpu").contiguous() for f in FIELDS if getattr(enc, f) is not None
        }
        tmp = path.with_suffix(".tmp")
        save_file(tensors, str(tmp), metadata={"key": key, "n": str(len(mine))})
        tmp.replace(path)  # atomic: a killed run leaves no half shard under the real name
        written += 1
    return paths, written


class ShardedLatents:
    """Row access over the shards without loading them: ``batch(idx)`` → an :class:`EncodedData` on ``device``."""

    def __init__(self, paths: list[Path], device, dtype: torch.dtype):
        from safetensors import safe_open

        self.handles = [safe_open(str(p), "pt") for p in paths]
        self.device, self.dtype = device, dtype
        self.index: list[tuple[int, int]] = []
        for s, fh in enumerate(self.handles):
            n = fh.get_slice("latent_mean").get_shape()[0]
            self.index += [(s, row) for row in range(n)]
        self.fields = [f for f in FIELDS if f in self.handles[0].keys()]  # noqa: SIM118

    def __len__(self) -> int:
        return len(self.index)

    def batch(self, idx: torch.Tensor) -> D.EncodedData:
        rows = [self.index[i] for i in idx.tolist()]
        out = {
            f: D.to_device(
                torch.stack([self.handles[s].get_slice(f)[row] for s, row in rows]), self.device
            ).to(self.dtype)
            for f in self.fields
        }
        return D.EncodedData(**out)
