"""Data commands: ingest, preprocess, caption, sample-data.

Each command takes its section from ``--config`` (a run config) when given; command-line options override
it. Work happens in :mod:`sdtune.data`; this module only parses options, shows progress and summarises.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)
from rich.text import Text

from sdtune.cli.printing import plain_console
from sdtune.config import load_config
from sdtune.data.stagedir import stage_output
from sdtune.errors import ConfigError
from sdtune.manifest import StageResult

console = plain_console()

ConfigOpt = Annotated[
    Path | None, typer.Option("--config", help="Run config YAML to take this stage's section from.")
]
OutOpt = Annotated[
    Path, typer.Option("--out", help="Output folder (created; must be empty or a previous run).")
]


def _section(config: Path | None, name: str, **overrides: Any):
    """The config section, with the options that were given on the command line applied on top."""
    section = getattr(load_config(config), name)
    given = {k: v for k, v in overrides.items() if v is not None}
    try:
        return type(section).model_validate({**section.model_dump(), **given})
    except ValidationError as exc:  # a bad option value: name the option, not pydantic's internals
        first = exc.errors()[0]
        option = "--" + str(first["loc"][0]).replace("_", "-")
        raise ConfigError(f"{option}: {first['msg']}") from None


@contextmanager
def _progress(label: str, total: int | None) -> Iterator[Callable[[str], None]]:
    """A rich progress bar on a terminal; nothing when output is piped (CI logs, KFP)."""
    columns = [SpinnerColumn(), TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    with Progress(*columns, console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(label, total=total)
        yield lambda _item: bar.advance(task)


def _summarise(stage: str, result: StageResult) -> None:
    counts = result.report.counts
    kept = counts.get("kept", 0) + counts.get("normalised", 0)
    line = Text.assemble((stage, "bold"), f": {kept} image(s) kept")
    if counts.get("normalised"):
        line.append(f" ({counts['normalised']} normalised)")
    line.append(f", {counts.get('skipped', 0)} skipped → {result.out_dir}")
    console.print(line, highlight=False)
    for reason, n in sorted(result.report.reasons.items()):
        console.print(f"  skipped {n} × {reason}", highlight=False)
    keys = ("upscaled", "holdout", "from_sidecar", "from_model", "truncated", "merged_from")
    extra = {k: v for k, v in result.report.summary.items() if k in keys}
    if extra:
        console.print("  " + ", ".join(f"{k}: {v}" for k, v in extra.items()), highlight=False)


def ingest_cmd(
    out: OutOpt,
    sources: Annotated[
        list[str] | None,
        typer.Argument(
            help="Folders, zips (path or @path), URLs, s3:// prefixes, catalogues; default: the config's."
        ),
    ] = None,
    min_images: Annotated[
        int | None, typer.Option("--min-images", help="Fewest usable images to accept.")
    ] = None,
    shard_size: Annotated[
        int | None, typer.Option("--shard-size", help="Records per shard (0: one shard); see shards.json.")
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Read images from the sources, normalise them, report every item.

    Example: sdtune ingest .sdtune/sample-data --out data/ingested
    """
    from sdtune.data.ingest import ingest

    cfg = _section(config, "ingest", min_images=min_images, shard_size=shard_size)
    with stage_output(out), _progress("ingest", None) as progress:
        result = ingest(list(sources or []) or cfg.sources, out, cfg, progress=progress)
    _summarise("ingest", result)


def preprocess_cmd(
    in_dir: Annotated[Path, typer.Argument(help="A stage folder (output of ingest).")],
    out: OutOpt,
    resolution: Annotated[int | None, typer.Option("--resolution", help="Square side in pixels.")] = None,
    crop: Annotated[str | None, typer.Option("--crop", help="center, face or none (buckets).")] = None,
    upscaler: Annotated[str | None, typer.Option("--upscaler", help="lanczos or swin2sr.")] = None,
    upscaler_model: Annotated[
        str | None, typer.Option("--upscaler-model", help="Swin2SR weights: folder, hub id or s3://.")
    ] = None,
    mask_prompt: Annotated[
        str | None, typer.Option("--mask-prompt", help="Write CLIPSeg subject masks for this text.")
    ] = None,
    mask_model: Annotated[
        str | None, typer.Option("--mask-model", help="CLIPSeg weights: folder, hub id or s3://.")
    ] = None,
    mask_source: Annotated[
        str | None,
        typer.Option("--mask-source", help="clipseg (with --mask-prompt) or face (ellipses over faces)."),
    ] = None,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Processes (default min(4, CPUs)).")
    ] = None,
    shard: Annotated[int | None, typer.Option("--shard", help="Process only this shard of IN_DIR.")] = None,
    config: ConfigOpt = None,
) -> None:
    """Crop and resize to the training resolution (Lanczos or Swin2SR upscaling for small images).

    Example: sdtune preprocess data/ingested --out data/pre --resolution 64
    """
    from sdtune.data.preprocess import preprocess_dir
    from sdtune.data.shards import record_shard
    from sdtune.manifest import iter_manifest

    cfg = _section(
        config,
        "preprocess",
        resolution=resolution,
        crop=crop,
        upscaler=upscaler,
        upscaler_model=upscaler_model,
        mask_prompt=mask_prompt,
        mask_model=mask_model,
        mask_source=mask_source,
        workers=workers,
    )
    total = sum(1 for r in iter_manifest(in_dir) if shard is None or record_shard(r) == shard)
    with stage_output(out), _progress("preprocess", total) as progress:
        result = preprocess_dir(in_dir, out, cfg, shard, progress=progress)
    _summarise("preprocess", result)


def caption_cmd(
    in_dir: Annotated[Path, typer.Argument(help="A stage folder (output of preprocess).")],
    out: OutOpt,
    trigger: Annotated[str | None, typer.Option("--trigger", help="Trigger token, e.g. sks.")] = None,
    class_noun: Annotated[str | None, typer.Option("--class-noun", help="Class noun, e.g. dog.")] = None,
    captioner: Annotated[
        str | None, typer.Option("--captioner", help="template, blip, blip2 or florence2.")
    ] = None,
    captioner_model: Annotated[
        str | None, typer.Option("--captioner-model", help="Captioner weights: folder, hub id or s3://.")
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", help="Training tokenizer (or model folder) for the length check."),
    ] = None,
    config: ConfigOpt = None,
) -> None:
    """Caption every image (sidecar captions win, else a model or the template) and choose the holdout split.

    Example: sdtune caption data/pre --out data/captioned --trigger sks --class-noun "toy robot"
    """
    from sdtune.data.caption import caption_dir

    cfg = _section(
        config,
        "caption",
        trigger=trigger,
        class_noun=class_noun,
        captioner=captioner,
        captioner_model=captioner_model,
        tokenizer=tokenizer,
    )
    with stage_output(out), _progress("caption", None) as progress:
        result = caption_dir(in_dir, out, cfg, progress=progress)
    _summarise("caption", result)


def merge_cmd(
    stage_dirs: Annotated[list[Path], typer.Argument(help="Shard outputs of one stage.")],
    out: OutOpt,
) -> None:
    """Merge the shard outputs of a stage (e.g. preprocess --shard K) into one stage folder.

    Example: sdtune merge data/pre-0 data/pre-1 --out data/pre
    """
    from sdtune.data.shards import merge_stages

    with stage_output(out):
        result = merge_stages(stage_dirs, out)
    _summarise("merge", result)


def sample_data_cmd(
    out: OutOpt,
    count: Annotated[int, typer.Option("--count", min=1, help="Number of pictures.")] = 12,
    seed: Annotated[int, typer.Option("--seed", help="Same seed, same bytes.")] = 0,
) -> None:
    """Write a small synthetic dataset (a toy robot, drawn locally) to try the pipeline with.

    Example: sdtune sample-data --out .sdtune/sample-data
    """
    from sdtune.data.sample import write_sample_dataset
    from sdtune.data.stagedir import check_out_dir

    check_out_dir(out, "sample-data")
    paths = write_sample_dataset(out, count=count, seed=seed)
    console.print(
        Text.assemble(("sample-data", "bold"), f": {len(paths)} picture(s) of the toy robot → {out}"),
        highlight=False,
    )


def register(app: typer.Typer) -> None:
    app.command("ingest")(ingest_cmd)
    app.command("preprocess")(preprocess_cmd)
    app.command("caption")(caption_cmd)
    app.command("merge")(merge_cmd)
    app.command("sample-data")(sample_data_cmd)
