"""New concept tokens for textual inversion and pivotal tuning: add, guard, save.

A concept with ``n`` vectors gets the tokens ``<sks>``, ``<sks>_1`` … ``<sks>_{n-1}`` (diffusers' own
multi-vector naming, so ``pipe.load_textual_inversion`` recreates them and expands ``<sks>`` in prompts).
Training captions have the trigger word replaced by all ``n`` tokens. Only the new rows of the embedding
matrix may change: :class:`RowGuard` copies the original rows back after every optimizer step (AdamW's
weight decay would otherwise touch them) and :meth:`RowGuard.unchanged` checks it bit for bit.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from sdtune.config import RunConfig
from sdtune.errors import ConfigError


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
    added = tokenizer.add_tokens(tokens)
    if added != len(tokens):
        raise ConfigError(f"tokens {tokens} already exist in the tokenizer: pick another caption.trigger")
    init_ids = tokenizer.encode(init_word, add_special_tokens=False)
    if not init_ids:
        raise ConfigError(f"train.initializer_token {init_word!r} does not tokenize")
    text_encoder.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    token_ids = torch.tensor(tokenizer.convert_tokens_to_ids(tokens), dtype=torch.long)
    weight = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        weight[token_ids] = weight[torch.tensor(init_ids)].mean(dim=0, keepdim=True).to(weight.dtype)
    return token_ids


@dataclass
class RowGuard:
    """Keeps every embedding row except ``trainable`` exactly as it was."""

    original: torch.Tensor
    keep: torch.Tensor  # bool mask over rows

    @classmethod
    def for_embedding(cls, weight: torch.Tensor, trainable: torch.Tensor) -> RowGuard:
        keep = torch.ones(weight.shape[0], dtype=torch.bool, device=weight.device)
        keep[trainable.to(weight.device)] = False
        return cls(original=weight.detach().clone(), keep=keep)

    @torch.no_grad()
    def restore(self, weight: torch.Tensor) -> None:
        weight[self.keep] = self.original[self.keep]

    @torch.no_grad()
    def unchanged(self, weight: torch.Tensor) -> bool:
        return bool(torch.equal(weight[self.keep], self.original[self.keep]))


class Concept:
    """The concept's new tokens in every tokenizer/text encoder of ``parts`` (SDXL: both), their ids and the
    embedding matrices that train (fp32), each guarded so only the new rows move."""

    def __init__(self, parts, cfg: RunConfig, device):
        self.cfg = cfg
        self.tokens = concept_tokens(cfg)
        pairs = [(parts.tokenizer, parts.text_encoder)]
        if parts.is_sdxl:
            pairs.append((parts.tokenizer_2, parts.text_encoder_2))
        self.encoders = [encoder for _, encoder in pairs]
        self.new_ids, self.weights, self.guards = [], [], []
        for tokenizer, encoder in pairs:
            ids = add_concept_tokens(tokenizer, encoder, self.tokens, initializer_word(cfg))
            encoder.to(device)
            weight = trainable_embeddings(encoder)
            self.new_ids.append(ids.to(device))
            self.weights.append(weight)
            self.guards.append(RowGuard.for_embedding(weight, ids))

    def caption(self, caption: str) -> str:
        return with_concept_tokens(caption, self.cfg.caption.trigger, self.tokens)

    def encode(self, parts, records, data_dir: Path, device):
        """The records' latents and their captions' token ids (the trigger replaced by the concept tokens),
        once: the text encoders run every step, since their input embeddings are what trains. The VAE is
        freed afterwards (``parts.vae`` becomes None; its config stays in the result)."""
        from .data import caption_of, encode_tokenized

        captions = [self.caption(caption_of(r, self.cfg)) for r in records]
        paths = [Path(data_dir) / r.file for r in records]
        data = encode_tokenized(parts, paths, captions, self.cfg.preprocess.resolution, device)
        parts.vae = None
        return data

    def modules(self) -> dict[str, torch.nn.Module]:
        """The text encoders by checkpoint name."""
        return {f"text_encoder_{i}": encoder for i, encoder in enumerate(self.encoders)}

    @staticmethod
    def use(parts, models: dict[str, torch.nn.Module]) -> None:
        """Run ``parts``' text conditioning through the (DDP-wrapped) encoders ``models``."""
        parts.text_encoder = models["text_encoder_0"]
        if parts.is_sdxl:
            parts.text_encoder_2 = models["text_encoder_1"]

    def restore(self) -> None:
        """After each optimizer step: put every row but the new ones back."""
        for guard, weight in zip(self.guards, self.weights, strict=True):
            guard.restore(weight)

    def checked_summary(self) -> dict:
        """The concept's facts for ``train_summary.json``, once every other row is checked bit for bit."""
        from sdtune.errors import TrainingError

        if not all(g.unchanged(w) for g, w in zip(self.guards, self.weights, strict=True)):
            raise TrainingError("textual inversion changed embedding rows other than the new tokens")
        return {"tokens": self.tokens, "other_embeddings_unchanged": True}

    @property
    def prompt(self) -> str:
        """The model card's example prompt (A1111 style: the trigger file's name in angle brackets)."""
        return self.cfg.format_prompt("a photo of <{trigger}> {class_noun}")

    def metrics(self) -> dict[str, float]:
        return {"embedding_norm": float(self.weights[0].detach()[self.new_ids[0]].norm(dim=-1).mean())}

    def save(self, out_dir: Path) -> list[str]:
        names = ["clip_l", "clip_g"]
        vectors = {
            names[i]: w[ids] for i, (w, ids) in enumerate(zip(self.weights, self.new_ids, strict=True))
        }
        return save_embeddings(vectors, self.tokens, out_dir, self.cfg.caption.trigger)


def trainable_embeddings(text_encoder) -> torch.nn.Parameter:
    """Freeze the encoder except its token embedding matrix; return that matrix (as fp32)."""
    text_encoder.requires_grad_(False)
    weight = text_encoder.get_input_embeddings().weight
    weight.data = weight.data.float()
    weight.requires_grad_(True)
    return weight


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
    """Load ``learned_embeds.safetensors`` into a pipeline (SD 1.x or SDXL); return the concept token."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    state = load_file(str(path))
    with safe_open(str(path), "pt") as fh:
        tokens = ((fh.metadata() or {}).get("tokens") or tokens_hint or "").split()
    if "clip_g" in state:
        token = tokens[0]
        pipe.load_textual_inversion(
            state["clip_l"], token=token, text_encoder=pipe.text_encoder, tokenizer=pipe.tokenizer
        )
        pipe.load_textual_inversion(
            state["clip_g"], token=token, text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2
        )
        return token
    pipe.load_textual_inversion(str(path))
    return next(iter(state))
