"""Output-directory handling shared by the stages: where files may be written, and re-runs."""

from __future__ import annotations

import hashlib
import io
import os
import re
import shutil
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from sdtune.errors import DatasetError
from sdtune.manifest import FAILED_NAME, ITEMS_NAME, MANIFEST_NAME, REPORT_NAME, Record

MARKER = ".sdtune-stage"  # written first: a folder holding it was made by a stage, even one that failed
GENERATED = re.compile(r"\d{6,}(\.mask)?\.png")
SHARDS_NAME = "shards.json"
# Everything a stage writes besides images; the dot-names are half-written files of a stage that died.
STAGE_FILES = frozenset({MANIFEST_NAME, REPORT_NAME, ITEMS_NAME, SHARDS_NAME, FAILED_NAME})
STAGE_TEMPS = frozenset(f".{name}.tmp" for name in STAGE_FILES)

# The non-stage commands reuse a non-empty --out only when it is an earlier output of the same command, told
# by the names it writes: (does the command write this name, must it have written every name there). Training
# outputs vary by method, so the files every run writes first (metrics.jsonl) or last (train_summary.json), or
# its checkpoints, mark one; a preempted run's folder is one, and is resumed.
EARLIER_OUTPUTS: dict[str, tuple[Callable[[str], bool], bool]] = {
    "train": (frozenset({"metrics.jsonl", "train_summary.json", "checkpoints"}).__contains__, False),
    "evaluate": (frozenset({"metrics.json", "grid.png", "samples", "report.html"}).__contains__, True),
    "generate": (re.compile(r"\d{2,}-seed\d+\.png|grid\.png").fullmatch, True),
    "sample-data": (re.compile(r"robot_\d{2,}\.(png|jpg|webp|txt)|\.complete").fullmatch, True),
}


class OutDirRefused(DatasetError):
    """``--out`` cannot be used; raised before anything is written, so :func:`stage_output` leaves it alone
    (that folder may be the input itself)."""


def refuse_unusable_out(out_dir: Path, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse an ``--out`` that is a file or lies under one, and one that is an input, lies inside one or
    holds one: a stage empties its folder before it reads, and outputs written into a dataset join it."""
    out_dir = Path(out_dir)
    for path in (out_dir, *out_dir.parents):
        if path.is_dir():
            break
        if os.path.lexists(path):  # a file, or a link to nothing
            under = "" if path == out_dir else f" ({path} is a file)"
            raise OutDirRefused(f"--out {out_dir} is not a folder{under}; name a new or empty folder")
    out = out_dir.resolve()
    for given in inputs:
        source = Path(given).resolve()
        if out == source:
            problem = "is the input folder"
        elif out.is_relative_to(source):
            problem = "lies inside the input"
        elif source.is_relative_to(out):
            problem = "holds the input"
        else:
            continue
        raise OutDirRefused(
            f"--out {out_dir} {problem} {given}: writing there would change the input; "
            "choose a new folder outside it"
        )


def check_out_dir(out_dir: Path, command: str, inputs: Iterable[Path | str] = ()) -> None:
    """Refuse, before anything is written, an ``--out`` for ``sdtune <command>`` that :func:`refuse_unusable_out`
    refuses or that holds files the command did not write: someone's files are never overwritten, while an
    earlier output of the same command is reused: training resumes from its checkpoints, and the outputs of
    ``evaluate``, ``generate`` and ``sample-data`` are replaced."""
    refuse_unusable_out(out_dir, inputs)
    out_dir = Path(out_dir)
    names = sorted(p.name for p in out_dir.iterdir()) if out_dir.is_dir() else []
    owns, all_owned = EARLIER_OUTPUTS[command]
    foreign = [name for name in names if not owns(name)]
    if foreign and (all_owned or len(foreign) == len(names)):
        raise OutDirRefused(
            f"--out {out_dir} is not empty (holds {foreign[0]!r}) and is not an earlier `sdtune {command}` "
            "output; use a new or empty folder"
        )
    if all_owned:  # an earlier output, all of it the command's own: replaced, so no stale sample outlives it
        for name in names:
            path = out_dir / name
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            else:
                path.unlink()


def prepare_out_dir(out_dir: Path, inputs: Iterable[Path | str] = ()) -> Path:
    """Create ``out_dir``; a previous run of a stage there is removed, anything else there is refused.

    Only folders marked as stage output are cleaned, and only of the files a stage writes, so a mistyped
    ``--out ~`` (or a folder of someone's ``000001.png`` frames) is never touched. ``inputs``: the stage's
    input folders and files, checked first: a stage's own input is marked as stage output too.
    """
    out_dir = Path(out_dir)
    refuse_unusable_out(out_dir, inputs)
    out_dir.mkdir(parents=True, exist_ok=True)
    if (out_dir / MARKER).is_file():
        for path in out_dir.iterdir():
            if GENERATED.fullmatch(path.name) or path.name in STAGE_FILES | STAGE_TEMPS:
                path.unlink()
    leftovers = sorted(p.name for p in out_dir.iterdir() if p.name != MARKER)
    if leftovers:
        raise OutDirRefused(
            f"--out {out_dir} is not empty (holds {leftovers[0]!r}); use a new or empty folder"
        )
    (out_dir / MARKER).write_text("written by sdtune; files here are replaced on the next run\n")
    return out_dir


@contextmanager
def stage_output(out_dir: Path) -> Iterator[None]:
    """Around one stage writing ``out_dir``: if it fails, a folder it created holding nothing of use is
    removed, and one with partial output gets a ``FAILED`` file with the reason, which the next stage refuses
    (:func:`sdtune.manifest.iter_manifest`)."""
    out_dir = Path(out_dir)
    existed = out_dir.exists()
    try:
        yield
    except OutDirRefused:
        raise  # nothing was written: the folder (perhaps the input) stays exactly as it was
    except BaseException as exc:
        if out_dir.is_dir() and (out_dir / MARKER).is_file():
            useful = [p for p in out_dir.iterdir() if p.name != MARKER and p.name not in STAGE_TEMPS]
            if not useful and not existed:
                shutil.rmtree(out_dir, ignore_errors=True)
            elif useful:
                reason = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
                (out_dir / FAILED_NAME).write_text(reason + "\n", encoding="utf-8")
        elif out_dir.is_dir() and not existed and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def safe_child(stage_dir: Path, name: str) -> Path:
    """``stage_dir / name``, refusing names that leave the stage directory (a tampered manifest)."""
    path = (stage_dir / name).resolve()
    if not path.is_relative_to(Path(stage_dir).resolve()) or path == Path(stage_dir).resolve():
        raise DatasetError(f"{stage_dir}: manifest names a file outside the stage directory: {name!r}")
    return path


def write_png(image: Image.Image, path: Path) -> str:
    """Write ``image`` as a metadata-free PNG (lossless, deterministic bytes); return the file's sha256."""
    image.info = {}  # otherwise Pillow copies the source's ICC/EXIF chunks into the output
    buf = io.BytesIO()
    # Level 1: encoding a 512-px photo takes ~55 ms instead of ~260 ms at level 6 (it was most of
    # preprocessing's time) for files ~15% larger; the bytes stay deterministic.
    image.save(buf, format="PNG", compress_level=1)
    data = buf.getvalue()
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


def load_record_image(stage_dir: Path, record: Record) -> Image.Image:
    path = safe_child(stage_dir, record.file)
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def link_or_copy(src: Path, dst: Path) -> None:
    """Hardlink (free) when both dirs share a filesystem, else copy: each stage dir stays self-contained."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def record_key(record: Record) -> tuple[int, str]:
    """Generated names in numeric order (``999999.png`` before ``1000000.png``)."""
    return len(record.file), record.file
