"""Shards: split a stage so the pipeline can fan preprocessing out (``dsl.ParallelFor``), then merge back.

Ingest tags each record with ``extra.shard`` and writes ``shards.json``; ``preprocess_dir(..., shard=k)``
handles one shard; :func:`merge_stages` joins the shard outputs into one stage directory. File names are
generated once, at ingest, so shards never collide and the merged order is the ingest order.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sdtune.data.stagedir import SHARDS_NAME, link_or_copy, prepare_out_dir, record_key, safe_child
from sdtune.errors import DatasetError
from sdtune.manifest import (
    REPORT_NAME,
    Record,
    StageResult,
    StageWriter,
    iter_manifest,
    iter_report_items,
    read_report,
)

# Summary values that describe the run rather than count things: kept when shards agree, never summed.
SETTINGS = frozenset(
    {
        "resolution",
        "crop",
        "upscaler",
        "template",
        "shard",
        "workers",
        "mask_prompt",
        "mask_source",
        "captioner",
    }
)


def write_shards(out_dir: Path, n_records: int, shard_size: int) -> list[dict[str, int]]:
    """Write ``shards.json``: ``{"shard_size": n, "shards": [{"id": 0, "count": …}, …]}``."""
    if shard_size <= 0:
        shards = [{"id": 0, "count": n_records}]
    else:
        shards = [
            {"id": i, "count": min(shard_size, n_records - i * shard_size)}
            for i in range(-(-n_records // shard_size))
        ]
    text = json.dumps({"shard_size": shard_size, "shards": shards}, indent=2) + "\n"
    (Path(out_dir) / SHARDS_NAME).write_text(text, encoding="utf-8")
    return shards


def read_shards(stage_dir: Path) -> list[int]:
    """The shard ids of a stage (``[0]`` for a stage written before sharding existed)."""
    path = Path(stage_dir) / SHARDS_NAME
    if not path.is_file():
        return [0]
    try:
        return [int(s["id"]) for s in json.loads(path.read_text(encoding="utf-8"))["shards"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise DatasetError(f"{path}: not a shards file ({type(exc).__name__})") from None


def record_shard(record: Record) -> int:
    return int(record.extra.get("shard", 0))


def merge_stages(stage_dirs: list[Path], out_dir: Path) -> StageResult:
    """Join shard outputs of one stage into ``out_dir``: images linked, manifests in ingest order, one report."""
    stage_dirs = [Path(d) for d in stage_dirs]
    if not stage_dirs:
        raise DatasetError("merge_stages: no stage directories given")
    for stage_dir in stage_dirs:
        if not (stage_dir / REPORT_NAME).is_file():
            raise DatasetError(f"merge_stages: {stage_dir} is not a stage directory (no {REPORT_NAME})")
    reports = [read_report(d) for d in stage_dirs]
    stages = {r.stage for r in reports}
    if len(stages) != 1:
        raise DatasetError(f"merge_stages: the directories come from different stages: {sorted(stages)}")
    # Each shard holds a contiguous range of ingest indices: order the shards by their first record.
    firsts = [min((record_key(r) for r in iter_manifest(d)), default=(0, "")) for d in stage_dirs]
    order = sorted(range(len(stage_dirs)), key=lambda i: firsts[i])
    out_dir = prepare_out_dir(Path(out_dir), inputs=stage_dirs)
    seen: set[str] = set()
    with StageWriter(out_dir, reports[0].stage) as writer:
        for i in order:
            stage_dir = stage_dirs[i]
            for record in sorted(iter_manifest(stage_dir), key=record_key):
                for name in _files_of(record):
                    if name in seen:
                        raise DatasetError(f"merge_stages: {name} is in more than one shard")
                    seen.add(name)
                    link_or_copy(safe_child(stage_dir, name), out_dir / name)
                writer.add_record(record)
            for item in iter_report_items(stage_dir):
                writer.add_item(item)
        summary = merge_summaries([reports[i].summary for i in order])
        summary["merged_from"] = len(stage_dirs)
        return writer.close(summary)


def merge_summaries(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts are summed; settings are kept when all shards agree, else listed."""
    merged: dict[str, Any] = {}
    keys = dict.fromkeys(k for s in summaries for k in s if k not in ("items_total", "items_file", "shard"))
    for key in keys:
        values = [s[key] for s in summaries if key in s]
        numeric = all(isinstance(v, int) and not isinstance(v, bool) for v in values)
        if numeric and key not in SETTINGS:
            merged[key] = sum(values)
        elif all(v == values[0] for v in values):
            merged[key] = values[0]
        else:
            merged[key] = values
    return merged


def _files_of(record: Record) -> list[str]:
    mask = record.extra.get("mask")
    return [record.file] + ([mask] if isinstance(mask, str) else [])
