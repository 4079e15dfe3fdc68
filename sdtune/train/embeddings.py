"""New concept tokens for textual inversion and pivotal tuning: add, guard, save.

A concept with ``n`` vectors gets the tokens ``<sks>``, ``<sks>_1`` … ``<sks>_{n-1}`` (diffusers' own
multi-vector naming, so ``pipe.load_textual_inversion`` recreates them and expands ``<sks>`` in prompts).
Training captions have the trigger word replaced by all ``n`` tokens. Only the new rows train: they are
their own small parameter (:class:`ConceptEmbedding`) in front of the frozen table, and the table's hash at
the end is checked against its hash at the start, bit for bit.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, NamedTuple

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError
from sdtune.models.loading import load_components

from .losses import Denoising, FlowMatching, objective_for


def concept_tokens(cfg: RunConfig) -> list[str]:
    base = f"<{cfg.caption.trigger}>"
    return [base] + [f"{base}_{i}" for i in range(1, cfg.train.num_vectors)]


def with_concept_tokens(caption: str, trigger: str, tokens: list[str]) -> str:
    """Replace the trigger word by the concept tokens (prepend them when the caption lacks the trigger)."""
    pattern = re.compile(rf"(?<![\w<]){re.escape(trigger)}(?![\w>])")
    joined = " ".join(tokens)
    if pattern.search(caption):
        return pattern.sub(joined, caption)
    return f"{joined} {caption}"


def initializer_word(cfg: RunConfig) -> str:
    return cfg.train.initializer_token or cfg.caption.class_noun.split()[-1]


def add_concept_tokens(tokenizer, text_encoder, tokens: list[str], init_word: str) -> torch.Tensor:
    """Add ``tokens`` to the tokenizer, grow the embedding matrix, start each new row at ``init_word``'s
    embedding (mean of its pieces). Returns the new token ids."""
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not init_ids:
        raise ConfigError(f"train.initializer_token {init_word!r} does not tokenize")
    token_ids = grow_vocabulary(tokenizer, text_encoder, tokens)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_ids] = weight[torch.tensor(init_ids)].mean(dim=0, keepdim=True).to(weight.dtype)
    return token_ids


def grow_vocabulary(tokenizer, text_encoder, tokens: list[str]) -> torch.Tensor:
    """Add ``tokens`` to the tokenizer and rows for them to the encoder's table (the way transformers documents
    it: ``add_tokens`` + ``resize_token_embeddings``); returns their ids. Rows' values are the caller's to set."""
    if tokenizer.add_tokens(tokens) != len(tokens):
        raise ConfigError(f"tokens {tokens} already exist in the tokenizer: pick another caption.trigger")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    return torch.tensor(tokenizer.convert_tokens_to_ids(tokens), dtype=torch.long)


class ConceptEmbedding(torch.nn.Module):
    """A text encoder's token-embedding table, frozen, plus the concept's rows as their own small parameter.

    Only :attr:`rows` (``[n, dim]``, fp32) trains: the optimizer, the gradient clipping and the checkpoint see
    ``n × dim`` values instead of the whole table (SDXL: 101 M), and every other row stays what it was by
    construction. The lookup is a gather and a ``where`` (no boolean indexing, no data-dependent shapes), so
    the encoder can be captured in a compiled or CUDA-graphed step. :meth:`merged` writes the rows into a
    plain table again (what a file loaded with ``load_textual_inversion`` recreates)."""

    def __init__(self, table: torch.nn.Embedding, token_ids: torch.Tensor):
        super().__init__()
        self.table = table.requires_grad_(False)
        token_ids = token_ids.to(table.weight.device)
        self.rows = torch.nn.Parameter(table.weight.detach()[token_ids].float().clone())
        slots = torch.full((table.num_embeddings,), -1, dtype=torch.long, device=table.weight.device)
        slots[token_ids] = torch.arange(len(token_ids), device=slots.device)
        self.register_buffer("slots", slots, persistent=False)  # token id → row of `rows`, -1 for the others
        self.register_buffer("token_ids", token_ids, persistent=False)

    @property
    def weight(self) -> torch.Tensor:
        """The frozen table (what callers that read ``get_input_embeddings().weight`` expect)."""
        return self.table.weight

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        base = self.table(input_ids)
        slot = self.slots[input_ids]
        new = self.rows[slot.clamp(min=0)].to(base.dtype)
        return torch.where((slot >= 0).unsqueeze(-1), new, base)

    @torch.no_grad()
    def merged(self) -> torch.nn.Embedding:
        """A plain embedding table with the trained rows written in (a copy; this module is left as it is)."""
        table = torch.nn.Embedding.from_pretrained(self.table.weight.detach().clone(), freeze=True)
        table.weight[self.token_ids] = self.rows.detach().to(table.weight.dtype)
        return table


def table_digest(weight: torch.Tensor) -> str:
    """sha256 of a table's bytes: the bit-for-bit check that no other row moved, without keeping a copy."""
    import hashlib

    return hashlib.sha256(weight.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class Concept:
    """The concept's new tokens in every CLIP tokenizer/text encoder of ``parts`` (SDXL, SD3: both) and their
    rows, which train as their own parameters (:attr:`weights`, fp32) in front of the frozen tables. SD3's T5
    gets no tokens: it stays frozen and reads the concept captions as they are (its states cached once)."""

    def __init__(self, parts, cfg: RunConfig, device):
        self.cfg = cfg
        self.tokens = concept_tokens(cfg)
        pairs = [(parts.tokenizer, parts.text_encoder)]
        if parts.text_encoder_2 is not None:
            pairs.append((parts.tokenizer_2, parts.text_encoder_2))
        self.encoders = [encoder for _, encoder in pairs]
        self.embeddings: list[ConceptEmbedding] = []
        for tokenizer, encoder in pairs:
            ids = add_concept_tokens(tokenizer, encoder, self.tokens, initializer_word(cfg))
            encoder.to(device)
            self.embeddings.append(concept_embedding(encoder, ids))
        self.weights = [e.rows for e in self.embeddings]  # what trains: n × dim values per encoder
        self.digests = [table_digest(e.weight) for e in self.embeddings]

    def caption(self, caption: str) -> str:
        return with_concept_tokens(caption, self.cfg.caption.trigger, self.tokens)

    def encode(self, parts, records, data_dir: Path, device):
        """The records' latents and their captions' token ids (the trigger replaced by the concept tokens),
        once: the text encoders run every step, since their input embeddings are what trains. The VAE is
        freed afterwards (``parts.vae`` becomes None; its config stays in the result)."""
        from .data import caption_of, encode_tokenized

        captions = [self.caption(caption_of(r, self.cfg)) for r in records]
        paths = [Path(data_dir) / r.file for r in records]
        res, t5_length = self.cfg.preprocess.resolution, self.cfg.train.max_sequence_length
        data = encode_tokenized(parts, paths, captions, res, device, t5_length)
        parts.vae = parts.text_encoder_3 = None
        return data

    def modules(self) -> dict[str, torch.nn.Module]:
        """The text encoders by checkpoint name."""
        return {f"text_encoder_{i}": encoder for i, encoder in enumerate(self.encoders)}

    @staticmethod
    def use(parts, models: dict[str, torch.nn.Module]) -> None:
        """Run ``parts``' text conditioning through the (DDP-wrapped) encoders ``models``."""
        parts.text_encoder = models["text_encoder_0"]
        if "text_encoder_1" in models:
            parts.text_encoder_2 = models["text_encoder_1"]

    def checked_summary(self) -> dict:
        """The concept's facts for ``train_summary.json``, once every other row is checked bit for bit."""
        from sdtune.errors import TrainingError

        now = [table_digest(e.weight) for e in self.embeddings]
        if now != self.digests:
            raise TrainingError("textual inversion changed embedding rows other than the new tokens")
        return {"tokens": self.tokens, "other_embeddings_unchanged": True}

    def merge(self) -> None:
        """Write the trained rows into each encoder's table (plain ``nn.Embedding`` again), e.g. to sample
        with the trained encoders in this process."""
        for encoder, embedding in zip(self.encoders, self.embeddings, strict=True):
            encoder.set_input_embeddings(embedding.merged())

    @property
    def prompt(self) -> str:
        """The model card's example prompt (A1111 style: the trigger file's name in angle brackets)."""
        return self.cfg.format_prompt("a photo of <{trigger}> {class_noun}")

    def metrics(self) -> dict[str, float]:
        return {"embedding_norm": float(self.weights[0].detach().norm(dim=-1).mean())}

    def save(self, out_dir: Path) -> list[str]:
        names = ["clip_l", "clip_g"]
        vectors = {names[i]: rows for i, rows in enumerate(self.weights)}
        return save_embeddings(vectors, self.tokens, out_dir, self.cfg.caption.trigger)


class ConceptStart(NamedTuple):
    """Where both concept recipes (textual inversion, pivotal tuning) start from."""

    parts: Any  # the loaded model, the concept's tokens in every tokenizer/text encoder
    concept: Concept
    data: Any  # latents and concept-caption token ids (see :meth:`Concept.encode`)
    denoiser: torch.nn.Module  # the UNet or SD3's transformer: frozen, on the session's device
    objective: Denoising | FlowMatching


def start_concept(cfg: RunConfig, session) -> ConceptStart:
    """Load the model with the concept's new tokens (only their embedding rows train), encode the session's
    records once (the VAE, and SD3's T5, are freed then), and place the denoiser; the family's objective
    (denoising; SD3: flow matching) comes with it."""
    parts = load_components(cfg)
    concept = Concept(parts, cfg, session.device)
    data = concept.encode(parts, session.records, session.data_dir, session.device)
    denoiser = session.place(parts.denoiser)
    return ConceptStart(parts, concept, data, denoiser, objective_for(cfg, parts.noise_scheduler))


def concept_loss(
    start: ConceptStart, denoiser, idx: torch.Tensor, session, train_rows: bool = True
) -> torch.Tensor:
    """The denoising (SD3: flow-matching) loss of ``denoiser`` (as :meth:`.session.Session.start` returned it) on
    the batch ``idx``, conditioned on its concept captions: the text encoders run every step, so gradients reach
    the concept rows (not when ``train_rows`` is False)."""
    from . import data as D

    parts, data = start.parts, start.data
    with torch.set_grad_enabled(train_rows):
        cond = D.text_conditioning(parts, data.ids(idx), session.cfg.preprocess.resolution)
    latents = D.sample_latents(data.vae_config, data, idx, session.draw)
    noisy, t, target = start.objective.add_noise(latents, session.draw)
    pred = D.predict(parts, denoiser, noisy, t, cond, session.dtype)
    return start.objective.loss(pred, target, t).mean()


def concept_embedding(text_encoder, token_ids: torch.Tensor) -> ConceptEmbedding:
    """Freeze the whole encoder and put a :class:`ConceptEmbedding` (its ``token_ids`` rows trainable, fp32)
    in place of its token-embedding table; return it."""
    text_encoder.requires_grad_(False)
    embedding = ConceptEmbedding(text_encoder.get_input_embeddings(), token_ids)
    text_encoder.set_input_embeddings(embedding)
    return embedding


def save_embeddings(
    vectors: dict[str, torch.Tensor], tokens: list[str], out_dir: Path, trigger: str
) -> list[str]:
    """``vectors``: encoder name (``clip_l``, and ``clip_g`` for SDXL) → ``[n, dim]``.

    Writes ``learned_embeds.safetensors`` (diffusers: ``{"<sks>": [n, dim]}`` for SD 1.x;
    ``{"clip_l": …, "clip_g": …}`` for SDXL) and ``<trigger>.safetensors`` (A1111: ``emb_params`` /
    ``clip_l`` + ``clip_g``; the file name is the prompt word). Returns the file names.
    """
    from safetensors.torch import save_file

    from .outputs import EMBEDDINGS

    cpu = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in vectors.items()}
    if set(cpu) == {"clip_l"}:
        diffusers_state, a1111_state = {tokens[0]: cpu["clip_l"]}, {"emb_params": cpu["clip_l"]}
    else:
        diffusers_state = a1111_state = cpu
    save_file(
        diffusers_state, str(out_dir / EMBEDDINGS), metadata={"format": "pt", "tokens": " ".join(tokens)}
    )
    save_file(a1111_state, str(out_dir / f"{trigger}.safetensors"), metadata={"format": "pt"})
    return [EMBEDDINGS, f"{trigger}.safetensors"]


def load_into_pipeline(pipe, path: Path, tokens_hint: str | None = None) -> str:
    """Load ``learned_embeds.safetensors`` into a pipeline (SD 1.x, SDXL or SD3); return what a prompt
    writes for the concept (SD3: all its tokens, as its pipeline does not expand ``<sks>``)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        tokens = ((fh.metadata() or {}).get("tokens") or tokens_hint or "").split()
    if "clip_g" not in state:
        pipe.load_textual_inversion(str(path))
        return next(iter(state))
    pairs = {"clip_l": (pipe.tokenizer, pipe.text_encoder), "clip_g": (pipe.tokenizer_2, pipe.text_encoder_2)}
    if not hasattr(pipe, "load_textual_inversion"):  # SD3's pipeline has no textual-inversion loader
        for name, (tokenizer, encoder) in pairs.items():
            ids = grow_vocabulary(tokenizer, encoder, tokens)
            weight = encoder.get_input_embeddings().weight
            with torch.no_grad():
                weight[ids] = state[name].to(weight.device, weight.dtype)
        return " ".join(tokens)
    for name, (tokenizer, encoder) in pairs.items():
        pipe.load_textual_inversion(state[name], token=tokens[0], text_encoder=encoder, tokenizer=tokenizer)
    return tokens[0]
