"""Textual inversion: learn new token embeddings for the subject; every other weight stays frozen.

Run it::

    sdtune train --config configs/sd15/textual_inversion_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- ``train.num_vectors``: N vectors for the concept, tokens ``<sks>``, ``<sks>_1`` … (``caption.trigger``);
  the trigger word in each caption is replaced by all N tokens.
- ``train.initializer_token`` (default: last word of ``caption.class_noun``): where the new rows start.
- Only the new embedding rows train, as their own ``[num_vectors, dim]`` parameter in front of the frozen table
  (:class:`~.embeddings.ConceptEmbedding`); the table is checked bit for bit at the end
  (``train_summary.json``: ``other_embeddings_unchanged``). SDXL and SD3: both CLIP text encoders get the
  tokens (SD3's T5 stays frozen and reads the concept captions as text; its states are computed once).
- VAE latents cached once; the text encoder runs every step (its input embeddings are what trains). The
  denoiser and objective are the family's (:func:`~.data.predict`): the UNet's noise, SD3's flow matching.
- Same optimizer, schedule, accumulation, seeding, logging and multi-process behaviour as :mod:`.lora`.

Writes (rank 0): ``learned_embeds.safetensors`` (diffusers ``load_textual_inversion``), ``<trigger>.safetensors``
(A1111: prompt with the file name), ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.tracking import MetricLogger

from . import embeddings as E
from .outputs import TrainResult
from .session import Session


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. Model: new tokens in every tokenizer/text encoder (only their embedding rows train);
        # data: latents cached once, captions tokenized once (with the concept tokens).
        start = E.start_concept(cfg, session)
        parts, concept = start.parts, start.concept

        models = session.start(
            concept.modules(),
            concept.weights,
            metrics=concept.metrics,
            validate=False,
            desc=f"textual inversion x{tc.num_vectors}",
        )
        concept.use(parts, models)

        # 2. Loop: the text encoders run every step (their input embeddings are what trains).
        for idx in session.steps():
            session.backward(E.concept_loss(start, start.denoiser, idx, session))

        # 3. Save (rank 0).
        return session.finish(
            "textual_inversion",
            concept.save,
            prompt=concept.prompt,
            **concept.checked_summary(),  # raises if any other embedding row moved
        )
