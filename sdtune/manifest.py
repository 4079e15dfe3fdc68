"""The on-disk contract between stages.

Every stage reads a directory and writes a new one holding:

- the images it produced (generated file names, never names taken from the input);
- ``manifest.jsonl``: one :class:`Record` per image, in a stable order;
- ``report.json``: a :class:`StageReport` with one :class:`ItemReport` per *input* item (kept, normalised or
  skipped, with a reason code) and counts per status and reason.

The same directories are the KFP ``Dataset`` artifacts, so a stage run by hand and a stage run as a
pipeline task produce byte-identical outputs.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

MANIFEST_NAME = "manifest.jsonl"
REPORT_NAME = "report.json"
# Written into a stage folder when the stage failed after writing some of it (the report says why): the
# next stage refuses such a folder instead of training on what a refused dataset left behind.
FAILED_NAME = "FAILED"

Status = Literal["kept", "normalised", "skipped"]


class Record(BaseModel):
    """One image in a stage's output directory."""

    model_config = ConfigDict(extra="forbid")

    file: str  # relative to the stage directory
    caption: str | None = None
    width: int
    height: int
    sha256: str  # of the file's bytes
    source: str  # where the image came from, credentials stripped
    split: Literal["train", "holdout"] = "train"
    extra: dict[str, Any] = Field(default_factory=dict)  # stage-specific fields (upscaled_from, bucket, …)


class ItemReport(BaseModel):
    """What a stage did with one input item."""

    model_config = ConfigDict(extra="forbid")

    item: str  # source id, credentials stripped
    status: Status
    reason: str = "ok"  # a stable reason code, documented in docs/data.md
    detail: str = ""
    transforms: list[str] = Field(default_factory=list)
    output: str | None = None  # the Record.file this item became, if any


class StageReport(BaseModel):
    stage: str
    items: list[ItemReport] = Field(default_factory=list)
    counts: dict[str, int] = Field(default_factory=dict)
    reasons: dict[str, int] = Field(default_factory=dict)
    summary: dict[str, Any] = Field(default_factory=dict)

    def add(self, item: ItemReport) -> None:
        self.items.append(item)

    def finalise(self) -> StageReport:
        self.counts = dict(Counter(i.status for i in self.items))
        self.reasons = dict(Counter(i.reason for i in self.items if i.status == "skipped"))
        return self

    @property
    def n_skipped(self) -> int:
        return sum(1 for i in self.items if i.status == "skipped")


class StageResult(BaseModel):
    """What a stage function returns: where it wrote, what it kept, what it reported."""

    out_dir: Path
    records: list[Record]
    report: StageReport


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def write_stage(out_dir: Path, records: Iterable[Record], report: StageReport) -> StageResult:
    """Write ``manifest.jsonl`` and ``report.json`` atomically (temp file + rename)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = list(records)
    report.finalise()
    _atomic_write(out_dir / MANIFEST_NAME, "".join(r.model_dump_json() + "\n" for r in records))
    _atomic_write(out_dir / REPORT_NAME, report.model_dump_json(indent=2) + "\n")
    return StageResult(out_dir=out_dir, records=records, report=report)


def read_manifest(stage_dir: Path) -> list[Record]:
    return list(iter_manifest(stage_dir))


def iter_manifest(stage_dir: Path) -> Iterator[Record]:
    from sdtune.errors import DatasetError

    failed = Path(stage_dir) / FAILED_NAME
    if failed.is_file():
        reason = failed.read_text(encoding="utf-8").strip().splitlines()[0:1] or ["see its report.json"]
        raise DatasetError(
            f"{stage_dir} is the output of a failed stage ({reason[0]}); fix that and run it again"
        )
    path = Path(stage_dir) / MANIFEST_NAME
    if not path.is_file():
        raise DatasetError(f"{stage_dir} is not a stage directory: {MANIFEST_NAME} is missing")
    with open(path, encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                yield _record(line, path, number)


def _record(line: str, path: Path, number: int) -> Record:
    """One manifest line; a line edited by hand into something else is one error naming it (a stage wrote
    every line, so a bad one means the folder was changed since: skipping it would train on less in silence)."""
    from pydantic import ValidationError

    from sdtune.errors import DatasetError

    try:
        return Record.model_validate_json(line)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ())) or "the line"
        raise DatasetError(
            f"{path} line {number} is not a manifest record ({where}: {first.get('msg', 'invalid')}); "
            "run the stage that wrote it again"
        ) from None


def read_report(stage_dir: Path) -> StageReport:
    return StageReport.model_validate_json((Path(stage_dir) / REPORT_NAME).read_text(encoding="utf-8"))


def manifest_digest(stage_dir: Path) -> str:
    """Content digest of a stage: the manifest lists every image's sha256, so this covers the pixels."""
    next(iter_manifest(stage_dir), None)  # refuses a failed or missing stage in one line
    return hashlib.sha256((Path(stage_dir) / MANIFEST_NAME).read_bytes()).hexdigest()


def report_markdown(report: StageReport) -> str:
    """The report as Markdown, for the KFP UI and MLflow."""
    lines = [f"# {report.stage} report", ""]
    lines += [f"- **{k}**: {v}" for k, v in sorted(report.counts.items())]
    if report.reasons:
        lines += ["", "| skip reason | count |", "|---|---|"]
        lines += [f"| {md_code(k)} | {v} |" for k, v in sorted(report.reasons.items())]
    lines += ["", "| item | status | reason | detail |", "|---|---|---|---|"]
    for item in report.items:
        reason = md_code(item.reason) if item.reason else ""
        lines.append(f"| {md_code(item.item)} | {md_text(item.status)} | {reason} | {md_text(item.detail)} |")
    return "\n".join(lines) + "\n"


def md_code(text: str) -> str:
    """``text`` as a Markdown table-cell code span that it cannot close: the fence is one backtick longer
    than any run of backticks inside (a member named ``a`![x](http://…)`` stays literal text)."""
    longest = max((len(run) for run in re.findall(r"`+", text)), default=0)
    fence = "`" * (longest + 1)
    cell = text.replace("|", "\\|")  # a pipe ends the table cell even inside a code span
    pad = " " if cell.startswith("`") or cell.endswith("`") else ""
    return f"{fence}{pad}{cell}{pad}{fence}"


def md_text(text: str) -> str:
    """Plain text in a Markdown table cell: every character Markdown or HTML would act on is escaped."""
    return re.sub(r"([\\`*_{}\[\]()<>#+!|~])", r"\\\1", text)


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        fh.write(text)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=True, default=str)


ITEMS_NAME = "report.items.jsonl"
REPORT_ITEMS_KEPT = 1000  # items repeated in report.json; the full list is in ITEMS_NAME


class StageWriter:
    """Write a stage as it runs, in memory that does not grow with the number of input items.

    Records go to ``manifest.jsonl`` and item reports to ``report.items.jsonl`` line by line; counts are kept
    incrementally. :meth:`close` writes ``report.json`` with the counts, the first ``keep_items`` items and
    ``summary.items_file`` pointing at the full list, so :func:`read_report` and :func:`report_markdown` keep
    working on a million-row catalogue. Files are written under temporary names and renamed at close, so
    a stage that fails half-way leaves no manifest behind (as :func:`write_stage` does).

    ``StageResult.records`` still holds every record (steps count them); an item that produced no record
    costs nothing once written.
    """

    def __init__(self, out_dir: Path, stage: str, *, keep_items: int = REPORT_ITEMS_KEPT) -> None:
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.report = StageReport(stage=stage)
        self.records: list[Record] = []
        self.n_items = 0
        self.keep_items = keep_items
        self._manifest = open(self._tmp(MANIFEST_NAME), "w", encoding="utf-8")  # noqa: SIM115
        self._items = open(self._tmp(ITEMS_NAME), "w", encoding="utf-8")  # noqa: SIM115
        self._closed = False

    def __enter__(self) -> StageWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None and not self._closed:
            self.abort()

    def add_record(self, record: Record) -> None:
        self._manifest.write(record.model_dump_json() + "\n")
        self.records.append(record)

    def add_item(self, item: ItemReport) -> None:
        self._items.write(item.model_dump_json() + "\n")
        self.n_items += 1
        if len(self.report.items) < self.keep_items:
            self.report.items.append(item)
        self.report.counts[item.status] = self.report.counts.get(item.status, 0) + 1
        if item.status == "skipped":
            self.report.reasons[item.reason] = self.report.reasons.get(item.reason, 0) + 1

    def close(self, summary: dict[str, Any] | None = None) -> StageResult:
        """Finish the files and write ``report.json``; returns the stage's result."""
        self.report.summary = {**(summary or {}), "items_total": self.n_items, "items_file": ITEMS_NAME}
        for fh, name in ((self._manifest, MANIFEST_NAME), (self._items, ITEMS_NAME)):
            fh.flush()
            os.fsync(fh.fileno())
            fh.close()
            os.replace(self._tmp(name), self.out_dir / name)
        self._closed = True
        _atomic_write(self.out_dir / REPORT_NAME, self.report.model_dump_json(indent=2) + "\n")
        return StageResult(out_dir=self.out_dir, records=self.records, report=self.report)

    def abort(self) -> None:
        for fh, name in ((self._manifest, MANIFEST_NAME), (self._items, ITEMS_NAME)):
            fh.close()
            self._tmp(name).unlink(missing_ok=True)
        self._closed = True

    def _tmp(self, name: str) -> Path:
        return self.out_dir / f".{name}.tmp"


def iter_report_items(stage_dir: Path) -> Iterator[ItemReport]:
    """Every item report of a stage: the full ``report.items.jsonl`` when there is one, else ``report.json``."""
    path = Path(stage_dir) / ITEMS_NAME
    if not path.is_file():
        yield from read_report(stage_dir).items
        return
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                yield ItemReport.model_validate_json(line)


def require_captions(stage_dir: Path) -> None:
    """Refuse a stage whose training images have no caption (an ingest or preprocess output): training
    would otherwise use the bare template for them without saying so."""
    from sdtune.errors import DatasetError

    records = [r for r in iter_manifest(stage_dir) if r.split == "train"]
    missing = sum(1 for r in records if not r.caption)
    if missing:
        raise DatasetError(
            f"{stage_dir}: {missing} of {len(records)} training image(s) have no caption; caption them first "
            f"(`sdtune caption {stage_dir} --out DIR --config CONFIG`, which falls back to caption.template)"
        )
