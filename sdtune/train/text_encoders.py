"""Text encoders that train beside the UNet (``train.train_text_encoder``), shared by :mod:`.lora` (a LoRA on
them) and :mod:`.dreambooth` (the whole encoders).

The captions are tokenized once and encoded every step, since the encoders change; with prior preservation
the class prompt goes through the training encoders too, so the class loss sees what the change does to the
class words. The encoders are not wrapped for DDP: their gradients are averaged over the ranks by hand
(:meth:`.session.Session.start`'s ``average_grads``), because SDXL's first encoder feeds its penultimate layer,
so its last layer gets no gradient, which DDP rejects.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sdtune.config import RunConfig

from . import data as D
from .class_images import class_prompt
from .prior import Prior


@dataclass
class TrainableText:
    """The encoders that train (``text_encoder`` and, SDXL, ``text_encoder_2``) and the token ids they read."""

    parts: object  # the loaded components: text_conditioning reads the encoders and tokenizers there
    encoders: dict[str, torch.nn.Module]
    token_ids: dict[str, torch.Tensor]  # one row per record of this rank
    class_ids: dict[str, torch.Tensor] | None  # the class prompt's (prior preservation)

    @classmethod
    def prepare(
        cls, parts, cfg: RunConfig, records: list, prior: Prior | None, device
    ) -> TrainableText | None:
        """The trainable text side when ``train.train_text_encoder``; otherwise None, and the encoders are
        dropped from ``parts`` (the text embeddings are cached)."""
        if not cfg.train.option("train_text_encoder"):
            parts.text_encoder = parts.text_encoder_2 = parts.text_encoder_3 = None
            return None

        def ids(prompts: list[str]) -> dict[str, torch.Tensor]:
            return {k: v.to(device) for k, v in D.tokenize_prompts(parts, prompts).items()}

        return cls(
            parts,
            {k: getattr(parts, k) for k in ("text_encoder", "text_encoder_2") if getattr(parts, k)},
            ids([D.caption_of(r, cfg) for r in records]),
            ids([class_prompt(cfg)]) if prior is not None else None,
        )


@dataclass
class StepConditioning:
    """Where a step's text conditioning comes from: the cache, or the training text encoders (``text``); with
    the class batch of prior preservation (``prior``) appended."""

    cache: D.EncodedData
    prior: Prior | None
    text: TrainableText | None
    vae_config: object  # the class latents are drawn with the VAE's scaling

    def inputs(self, latents: torch.Tensor, idx: torch.Tensor, session) -> tuple[torch.Tensor, dict]:
        """The latents and conditioning for the instance batch ``idx`` (its ``latents`` drawn)."""
        prior, text = self.prior, self.text
        if text is None:
            cond = D.cached_text(self.cache, idx)
            if prior is not None:
                latents, cond = prior.join(latents, cond, self.vae_config, session.draw, session.device)
            return latents, cond
        ids = {k: v[idx] for k, v in text.token_ids.items()}
        if prior is not None:
            cidx, class_latents = prior.next_batch(self.vae_config, session.draw, session.device)
            latents = torch.cat([latents, class_latents])
            ids = {k: torch.cat([v, text.class_ids[k].expand(len(cidx), -1)]) for k, v in ids.items()}
        return latents, D.text_conditioning(text.parts, ids, session.cfg.preprocess.resolution)
