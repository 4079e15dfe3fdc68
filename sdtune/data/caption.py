"""``caption_dir``: give every image a caption and a train/holdout split.

A sidecar caption carried from ingest (``name.txt`` beside ``name.jpg``, or a catalogue column) wins when
``use_sidecars`` is on; otherwise a captioning model (``captioner: blip|blip2|florence2``, batched, wrapped in
``model_template``) or the template (``"a photo of {trigger} {class_noun}"``) gives one. With ``tokenizer`` set,
captions longer than the text encoder reads are cut and reported (``caption_truncated``). The
holdout split is deterministic in the images' *content* (sha256 order), so re-running, or ingesting the same
pictures in another order, holds out the same pictures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from sdtune.config import CaptionConfig
from sdtune.data.stagedir import link_or_copy, load_record_image, prepare_out_dir, safe_child
from sdtune.errors import ConfigError
from sdtune.manifest import ItemReport, Record, StageResult, StageWriter, read_manifest


def template_caption(cfg: CaptionConfig) -> str:
    try:
        return cfg.template.format(trigger=cfg.trigger, class_noun=cfg.class_noun)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"caption.template {cfg.template!r}: only {{trigger}} and {{class_noun}} may be used ({exc})"
        ) from None


def holdout_count(n: int, fraction: float) -> int:
    """How many of ``n`` images to hold out: at least 1 when n ≥ 5 and fraction > 0, never all."""
    k = int(n * fraction)
    if fraction > 0 and n >= 5:
        k = max(k, 1)
    return max(0, min(k, n - 1))


def holdout_files(records: list[Record], fraction: float) -> set[str]:
    k = holdout_count(len(records), fraction)
    ranked = sorted(records, key=lambda r: hashlib.sha256(f"holdout:{r.sha256}".encode()).hexdigest())
    return {r.file for r in ranked[:k]}


def caption_dir(
    in_dir: Path, out_dir: Path, cfg: CaptionConfig, *, progress: Callable[[str], None] | None = None
) -> StageResult:
    in_dir = Path(in_dir)
    records_in = read_manifest(in_dir)
    template = template_caption(cfg)
    captioner = None
    if cfg.captioner != "template":
        from sdtune.data.captioners import load_captioner, wrap_model_caption

        wrap_model_caption(cfg, "")  # a bad model_template fails before the model loads
        captioner = load_captioner(cfg)
    limit = None
    if cfg.tokenizer:
        from sdtune.data.captioners import TokenLimit

        limit = TokenLimit(cfg)
    out_dir = prepare_out_dir(Path(out_dir), inputs=[in_dir])
    held_out = holdout_files(records_in, cfg.holdout_fraction)
    counts = {"from_sidecar": 0, "from_model": 0, "truncated": 0}
    with StageWriter(out_dir, "caption") as writer:
        for start in range(0, len(records_in), cfg.batch_size):
            batch = records_in[start : start + cfg.batch_size]
            for record, (caption, source) in zip(
                batch, _captions(batch, in_dir, cfg, template, captioner), strict=True
            ):
                record_out, item = _finish(record, caption, source, limit, cfg, held_out)
                for name in [record.file] + ([record.extra["mask"]] if "mask" in record.extra else []):
                    link_or_copy(safe_child(in_dir, name), out_dir / name)  # masks travel with their image
                counts["from_sidecar"] += source == "caption_sidecar"
                counts["from_model"] += source == "caption_model"
                counts["truncated"] += item.reason == "caption_truncated"
                writer.add_record(record_out)
                writer.add_item(item)
                if progress:
                    progress(record.file)
        summary = {"images": len(records_in), "holdout": len(held_out), **counts, "template": template}
        if captioner is not None:
            summary["captioner"] = cfg.captioner
        return writer.close(summary)


def _captions(
    batch: list[Record], in_dir: Path, cfg: CaptionConfig, template: str, captioner
) -> list[tuple[str, str]]:
    """(caption, transform) per record: sidecar, else the model's (wrapped), else the template."""
    out = [
        (r.caption, "caption_sidecar") if cfg.use_sidecars and r.caption else (template, "caption_template")
        for r in batch
    ]
    need = [i for i, (_, source) in enumerate(out) if source == "caption_template"]
    if captioner is not None and need:
        from sdtune.data.captioners import wrap_model_caption

        texts = captioner([load_record_image(in_dir, batch[i]) for i in need])
        for i, text in zip(need, texts, strict=True):
            if text:  # an empty generation keeps the template
                out[i] = (wrap_model_caption(cfg, text), "caption_model")
    return out


def _finish(
    record: Record, caption: str, source: str, limit, cfg: CaptionConfig, held_out: set[str]
) -> tuple[Record, ItemReport]:
    split = "holdout" if record.file in held_out else "train"
    details = [f"split={split}"]
    status, reason = "kept", "ok"
    if limit is not None:
        caption, n_tokens = limit.fit(caption)
        if n_tokens > cfg.max_tokens:
            status, reason = "normalised", "caption_truncated"
            details.append(f"{n_tokens} tokens > max_tokens={cfg.max_tokens}: cut to {caption!r}")
    item = ItemReport(
        item=record.file,
        status=status,
        reason=reason,
        detail="; ".join(details),
        transforms=[source],
        output=record.file,
    )
    return record.model_copy(update={"caption": caption, "split": split}), item
