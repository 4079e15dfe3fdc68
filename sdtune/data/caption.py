"""``caption_dir``: give every image a caption and a train/holdout split.

A sidecar caption carried from ingest (``name.txt`` beside ``name.jpg``, or a catalogue column) wins when
``use_sidecars`` is on; otherwise the template is filled in (``"a photo of {trigger} {class_noun}"``). The
holdout split is deterministic in the images' *content* (sha256 order), so re-running, or ingesting the same
pictures in another order, holds out the same pictures.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

from sdtune.config import CaptionConfig
from sdtune.data.stagedir import link_or_copy, prepare_out_dir, safe_child
from sdtune.errors import ConfigError
from sdtune.manifest import ItemReport, Record, StageReport, StageResult, read_manifest, write_stage


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
    out_dir = prepare_out_dir(Path(out_dir))
    held_out = holdout_files(records_in, cfg.holdout_fraction)
    report = StageReport(stage="caption")
    records: list[Record] = []
    for record in records_in:
        from_sidecar = cfg.use_sidecars and bool(record.caption)
        caption = record.caption if from_sidecar else template
        link_or_copy(safe_child(in_dir, record.file), out_dir / record.file)
        split = "holdout" if record.file in held_out else "train"
        records.append(record.model_copy(update={"caption": caption, "split": split}))
        report.add(
            ItemReport(
                item=record.file,
                status="kept",
                detail=f"split={split}",
                transforms=["caption_sidecar" if from_sidecar else "caption_template"],
                output=record.file,
            )
        )
        if progress:
            progress(record.file)
    report.summary = {
        "images": len(records),
        "holdout": len(held_out),
        "from_sidecar": sum(1 for i in report.items if "caption_sidecar" in i.transforms),
        "template": template,
    }
    return write_stage(out_dir, records, report)
