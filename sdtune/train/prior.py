"""Prior preservation, shared by DreamBooth and LoRA: class images ride along with every instance batch.

Each step also denoises a batch of class images captioned ``train.class_prompt`` ("a photo of {class_noun}"),
and the loss is instance + ``prior_loss_weight`` × class. Without it, a fine-tune on "a photo of sks toy
robot" has no signal that keeps "a photo of toy robot" where it was: the class prompt drifts to the subject
(language drift; DreamBooth paper, §3.3). Class images come from :mod:`.class_images` (supplied, or generated
once with the base model and cached by content); their latents and text embeddings are computed once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.config import RunConfig

from . import data as D
from .class_images import class_images, class_prompt


def class_image_paths(cfg: RunConfig, session) -> list:
    """The class images when ``train.with_prior_preservation`` is on (generated before the model loads)."""
    return class_images(cfg, session.accelerator) if cfg.train.with_prior_preservation else []


@dataclass
class Prior:
    """This rank's share of the class images, encoded, and a resumable sampler over them."""

    data: D.EncodedData
    sampler: D.EpochSampler
    weight: float

    @classmethod
    def encode(cls, parts, paths: list, cfg: RunConfig, session) -> Prior | None:
        if not paths:
            return None
        tc = cfg.train
        mine = D.shard(paths, session.rank, session.world)
        data = D.encode_files(
            parts, mine, [class_prompt(cfg)] * len(mine), cfg, session.device, session.dtype
        )
        return cls(
            data,
            D.EpochSampler(len(data), tc.batch_size, tc.seed + 7919 + session.rank),
            tc.prior_loss_weight,
        )

    def next_batch(self, vae_config, draw, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(indices, scaled latents) of the next class batch."""
        idx = D.to_device(next(self.sampler), device)  # pinned, asynchronous on CUDA
        return idx, D.sample_latents(vae_config, self.data, idx, draw)

    def join(self, latents: torch.Tensor, text: dict, vae_config, draw, device) -> tuple[torch.Tensor, dict]:
        """The instance batch with a class batch appended (latents and cached text conditioning)."""
        idx, class_latents = self.next_batch(vae_config, draw, device)
        return torch.cat([latents, class_latents]), D.cat_text(text, D.cached_text(self.data, idx))

    def loss(self, per_sample: torch.Tensor, n: int, session) -> tuple[torch.Tensor, torch.Tensor]:
        """(instance loss, total loss) from the per-sample losses of a joined batch of ``n`` instances."""
        instance = per_sample[:n].mean()
        prior_loss = per_sample[n:].mean()
        session.track("prior_loss", prior_loss)
        return instance, instance + self.weight * prior_loss


def denoising_step(
    parts, model, objective, latents: torch.Tensor, text: dict, n: int, prior: Prior | None, session
) -> None:
    """Noise a batch of ``n`` instances (and the class batch :meth:`Prior.join` appended), predict with the
    denoiser ``model`` (UNet or SD3 transformer, :func:`.data.predict`) and back-propagate the instance loss
    (+ ``prior_loss_weight`` × the class loss); the instance loss is logged."""
    noisy, t, target = objective.add_noise(latents, session.draw)
    per_sample = objective.loss(D.predict(parts, model, noisy, t, text, session.dtype), target, t)
    loss = total = per_sample[:n].mean()
    if prior is not None:
        loss, total = prior.loss(per_sample, n, session)
    session.backward(total, tracked=loss)
