"""Pivotal tuning: textual inversion and a denoiser LoRA trained together (the "pivot" is the new token).

Run it::

    sdtune train --config configs/sd15/pivotal_1gpu.yaml --data DIR --out DIR

Features (config key → behaviour):

- New tokens ``<sks>``, ``<sks>_1`` … (``train.num_vectors``, ``initializer_token``) replace the trigger word in
  captions, exactly as in :mod:`.textual_inversion`; only their rows change (checked bit for bit).
- A LoRA on the UNet (SD3: the transformer; ``train.rank``, ``alpha``, ``target_modules``) as in :mod:`.lora`
  (:mod:`.sd3_lora`); the tokens go into both CLIP encoders on SDXL and SD3 (not T5), as in textual inversion.
- Two learning rates: ``train.embedding_learning_rate`` (default: ``learning_rate``) for the embeddings,
  ``train.learning_rate`` for the LoRA.
- ``train.embedding_train_fraction``: after that fraction of the steps the embeddings freeze and training
  goes on LoRA-only (the usual recipe: ~0.5, so the LoRA adapts to a settled token).
- Same data caching, schedule, accumulation, seeding, logging and multi-process behaviour as :mod:`.lora`.

Writes (rank 0): ``pytorch_lora_weights.safetensors`` + ``lora_kohya.safetensors``, ``learned_embeds.safetensors``
+ ``<trigger>.safetensors``, ``metrics.jsonl``, ``config.yaml``, ``train_summary.json``, ``README.md``. Load both:
``pipe.load_textual_inversion(".../learned_embeds.safetensors"); pipe.load_lora_weights("...")``.
"""

from __future__ import annotations

from pathlib import Path

from sdtune.config import RunConfig
from sdtune.models.families import family_of
from sdtune.tracking import MetricLogger

from . import embeddings as E
from .adapters import add_lora, to_fp32
from .outputs import TrainResult, save_lora
from .session import Session


def train(cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None) -> TrainResult:
    tc = cfg.train
    with Session(cfg, data_dir, out_dir, logger) as session:
        # 1. As in textual inversion: the concept's tokens (only their embedding rows train), latents and
        # the concept captions' token ids once; the denoiser frozen under its LoRA.
        start = E.start_concept(cfg, session)
        parts, concept, denoiser = start.parts, start.concept, start.denoiser

        # 2. A LoRA on the denoiser (UNet; SD3: transformer), as in the LoRA recipe; two learning rates.
        denoiser_name = family_of(cfg).denoiser
        lora_params = add_lora(denoiser, tc, tc.target_modules)
        to_fp32(lora_params)
        models = session.start(
            {denoiser_name: denoiser, **concept.modules()},
            [*concept.weights, *lora_params],
            groups=[
                {"params": concept.weights, "lr": tc.embedding_learning_rate or tc.learning_rate},
                {"params": lora_params, "lr": tc.learning_rate},
            ],
            metrics=concept.metrics,
            validate=False,
            desc=f"pivotal x{tc.num_vectors} r{tc.rank}",
        )
        denoiser = models[denoiser_name]
        concept.use(parts, models)
        embedding_steps = max(1, round(tc.embedding_train_fraction * tc.max_steps))

        # 3. Loop: the embeddings train for the first `embedding_steps`, then the LoRA alone.
        for idx in session.steps():
            train_rows = session.step <= embedding_steps
            session.backward(E.concept_loss(start, denoiser, idx, session, train_rows))

        # 4. Save (rank 0): the embeddings and the LoRA.
        return session.finish(
            "pivotal",
            lambda out: concept.save(out) + save_lora(session.plain_models()[denoiser_name], out, cfg),
            prompt=concept.prompt,
            **concept.checked_summary(),  # raises if any other embedding row moved
            embedding_steps=embedding_steps,
        )
