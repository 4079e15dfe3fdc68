"""Hostile zips: limits from the central directory, symlinks, nested archives, junk, zip slip."""

from __future__ import annotations

import contextlib
import stat
import subprocess
import sys
import tempfile
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
from data_helpers import encode, make_zip, pattern
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
from sdtune.data.stagedir import STAGE_FILES
from sdtune.errors import DatasetError

CFG = IngestConfig(min_images=1, min_side=16, max_reject_fraction=1.0)


def _symlink_info(name: str) -> zipfile.ZipInfo:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix, so the high bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    return info


def test_odd_members_are_skipped_with_reasons(tmp_path):
    archive = tmp_path / "mac.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("photos/a.png", encode(pattern(seed=1), "PNG"))
        zf.writestr("photos/b.jpg", encode(pattern(seed=2), "JPEG"))
        zf.writestr(_symlink_info("photos/link.png"), "../../../../etc/passwd")
        zf.writestr("photos/inner.zip", b"PK\x03\x04 nested")
        zf.writestr("photos/disguised.png", make_zip_in_memory())
        zf.writestr("__MACOSX/photos/._a.png", b"\x00\x05\x16\x07")
        zf.writestr("photos/.DS_Store", b"\x00\x00\x00\x01Bud1")
        zf.writestr("photos/Thumbs.db", b"\xd0\xcf")
        zf.writestr("photos/empty.png", b"")
        zf.writestr("photos/", b"")
    result = ingest([str(archive)], tmp_path / "out", CFG)
    assert len(result.records) == 2
    assert result.report.reasons == {
        "symlink": 1,
        "nested_archive": 2,
        "junk_member": 3,
        "empty_file": 1,
    }
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        ".sdtune-stage",
        "000000.png",
        "000001.png",
        "manifest.jsonl",
        "report.items.jsonl",
        "report.json",
        "shards.json",
    ]


def test_encrypted_members_are_skipped_unread():
    from sdtune.data.archive import _skip_reason

    info = zipfile.ZipInfo("locked.png")
    info.flag_bits |= 0x1  # zipfile cannot write encrypted members; the listing is what is checked
    assert _skip_reason(info) == ("encrypted", "encrypted member")


def make_zip_in_memory() -> bytes:
    import io

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("x.png", encode(pattern(), "PNG"))
    return buf.getvalue()


def test_zip_bomb_refused_from_the_central_directory(tmp_path):
    bomb = make_zip(
        tmp_path / "bomb.zip", {"a.png": encode(pattern(), "PNG"), "zeros.png": b"\0" * (8 << 20)}
    )
    with pytest.raises(DatasetError, match=r"expands \d+x, over the limit of 200x"):
        ingest([str(bomb)], tmp_path / "out", CFG)


def test_entry_count_and_total_size_limits(tmp_path):
    archive = make_zip(tmp_path / "many.zip", {f"{i}.png": encode(pattern(seed=i), "PNG") for i in range(5)})
    with pytest.raises(DatasetError, match="5 entries is over the limit of 3"):
        ingest([str(archive)], tmp_path / "o1", CFG.model_copy(update={"zip_max_entries": 3}))
    with pytest.raises(DatasetError, match="uncompressed bytes is over the limit of 1000"):
        ingest([str(archive)], tmp_path / "o2", CFG.model_copy(update={"zip_max_total_bytes": 1000}))


def test_member_byte_cap(tmp_path):
    noise = Image.frombytes("RGB", (64, 64), np.random.default_rng(0).bytes(64 * 64 * 3))  # ~12 KB as PNG
    archive = make_zip(
        tmp_path / "big.zip", {"big.png": encode(noise, "PNG"), "ok.png": encode(pattern(), "PNG")}
    )
    result = ingest([str(archive)], tmp_path / "out", CFG.model_copy(update={"max_image_bytes": 2000}))
    assert result.report.reasons == {"too_large_file": 1}


def test_pixel_bomb_in_a_zip_keeps_memory_bounded(tmp_path):
    """A 100000×100000 PNG header: refused before decoding, so peak RSS stays small (checked in a fresh process)."""
    from test_images import _png_header_only

    archive = make_zip(
        tmp_path / "px.zip",
        {"bomb.png": _png_header_only(100_000, 100_000), "ok.png": encode(pattern(), "PNG")},
    )
    code = f"""
import sys
from pathlib import Path
from sdtune.config import IngestConfig
from sdtune.data.ingest import ingest
r = ingest([{str(archive)!r}], Path({str(tmp_path / "out")!r}), IngestConfig(min_images=1, min_side=16, max_reject_fraction=1))
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))  # not ru_maxrss: see test_scale
print(r.report.reasons, int(hwm.split()[1]) // 1024)
"""
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.split()
    assert out[:2] == ["{'pixel_bomb':", "1}"]
    assert int(out[-1]) < 300  # MiB; decoding 10^10 pixels would need 30 GB


HOSTILE_PARTS = ["..", ".", "", "/", "\\", "C:", "..\\..", "etc", "passwd", "~", "%2e%2e", "a\nb", "\x1b[31m",
                 "é", "CON", "__MACOSX", "._x", ".DS_Store", "x" * 100, "/tmp", "out", "..%2f"]  # fmt: skip


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    names=st.lists(
        st.tuples(
            st.lists(
                st.sampled_from(HOSTILE_PARTS) | st.text(min_size=1, max_size=8), min_size=1, max_size=6
            ),
            st.sampled_from(["/", "\\"]),
            st.sampled_from([".png", ".jpg", "", ".txt", ".zip"]),
            st.booleans(),
        ),
        min_size=1,
        max_size=6,
    )
)
def test_no_file_ever_appears_outside_out(names):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        archive = root / "evil.zip"
        with zipfile.ZipFile(archive, "w") as zf, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "Duplicate name": duplicates are part of the attack
            for i, (parts, sep, suffix, symlink) in enumerate(names):
                name = sep.join(parts) + suffix
                info = _symlink_info(name) if symlink else zipfile.ZipInfo(name)
                zf.writestr(info, "/etc/passwd" if symlink else encode(pattern(24, 24, seed=i), "PNG"))
        before = _tree(root)
        with contextlib.suppress(DatasetError):  # nothing usable is a fine outcome; escaping is not
            ingest([str(archive)], root / "out", CFG)
        after = _tree(root)
        created = after - before
        assert all(p.startswith("out/") or p == "out" for p in created), created
        outputs = {p for p in created if p != "out"}
        assert all(
            Path(p).name[:6].isdigit() or Path(p).name in STAGE_FILES | {".sdtune-stage"} for p in outputs
        )
        assert not any((root / p).is_symlink() for p in after)


def _tree(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*")}
