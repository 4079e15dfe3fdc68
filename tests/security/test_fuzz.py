"""Standing fuzz test of the parsers that take untrusted bytes: zip central directories and member names,
catalogues (CSV, JSONL, Parquet), image headers, sidecars, URLs and redirects, config overrides.

Properties: no exception but the documented one-line errors, no file written outside ``--out``, every input
either kept or reported, and bounded memory. ``make test`` runs a few examples per parser
(``SDTUNE_FUZZ_EXAMPLES``, default 25); ``make fuzz`` runs many more.
"""

from __future__ import annotations

import io
import json
import os
import resource
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from sdtune.config import IngestConfig, config_from_dict, parse_overrides, strip_url_credentials
from sdtune.data.catalogue import iter_catalogue
from sdtune.data.fetch import redirect_target
from sdtune.data.images import decode_image
from sdtune.data.ingest import ingest
from sdtune.data.items import Item, Skip, sidecar_text, strip_credentials
from sdtune.data.reasons import SkipItem
from sdtune.errors import ConfigError, DatasetError

# Corrupt EXIF, duplicate zip names: the libraries warn about what the fuzzer feeds them, as they should.
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
EXAMPLES = int(os.environ.get("SDTUNE_FUZZ_EXAMPLES", "25"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=EXAMPLES <= 100,  # the short run in `make test` is reproducible; `make fuzz` explores
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
    ],
)
RSS_LIMIT_KB = 3 << 20  # 3 GiB: a bomb that got through would blow far past it

_buf = io.BytesIO()
Image.new("RGB", (64, 64), (200, 30, 30)).save(_buf, format="PNG")
PNG = _buf.getvalue()

names = st.lists(
    st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12)
    | st.sampled_from(["..", "/", "\\", "`", "|", "\x00", "C:", "__MACOSX", ".DS_Store", "a.txt"]),
    min_size=1,
    max_size=4,
).map("/".join)
SIGNATURES = [
    b"\x89PNG\r\n\x1a\n",
    b"\xff\xd8\xff",
    b"GIF89a",
    b"RIFF\x00\x00\x00\x00WEBP",
    b"BM",
    b"II*\x00",
    b"PK\x03\x04",
]


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*")}


def _rss_ok() -> None:
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss < RSS_LIMIT_KB


@FUZZ
@given(members=st.lists(st.tuples(names, st.sampled_from([PNG, b"", b"not an image", PNG[:40]])), max_size=6))
def test_zip_members(tmp_path_factory, members):
    root = tmp_path_factory.mktemp("zip")
    archive = root / "in.zip"
    try:
        with zipfile.ZipFile(archive, "w") as zf:
            for name, data in members:
                zf.writestr(name, data)
    except (IndexError, ValueError):  # zipfile itself cannot write that name
        assume(False)
    before = _files(root)
    out = root / "out"
    try:
        result = ingest(
            [str(archive)],
            out,
            IngestConfig(min_images=1, max_reject_fraction=1.0, near_duplicate_distance=None),
        )
    except DatasetError as exc:
        assert "\n" not in str(exc)
    else:
        # Every member is kept or reported; only sidecar captions (.txt) ride along with their image.
        reported = result.report.summary["items_total"]
        stored = [(n.split("\x00")[0], d) for n, d in members]  # zipfile cuts a name at a NUL byte
        silent = [n for n, d in stored if n.lower().endswith(".txt") or (n.endswith("/") and not d)]
        assert len(members) - len(silent) <= reported <= len(members)
    assert {p for p in _files(root) - before if not p.is_relative_to(out)} == set()
    _rss_ok()


@FUZZ
@given(head=st.sampled_from(SIGNATURES), tail=st.binary(max_size=300))
def test_image_headers(head, tail):
    try:
        decoded = decode_image(head + tail, max_pixels=1_000_000)
    except SkipItem as skip:
        assert skip.reason and "\n" not in skip.detail
    else:
        assert decoded.image.mode == "RGB"
    _rss_ok()


@FUZZ
@given(data=st.binary(max_size=20_000))
def test_sidecars(data):
    text = sidecar_text(io.BytesIO(data))
    assert text is None or len(text.encode()) <= 4096 * 3  # 4,096 bytes read, replacement chars at most 3x


cells = st.text(max_size=30) | st.sampled_from(
    ["s3://ours/a.png", "s3://x/../y", "http://127.0.0.1/a", "../../etc/passwd", "a.png", ""]
)


@FUZZ
@given(
    kind=st.sampled_from(["csv", "jsonl", "parquet"]),
    rows=st.lists(st.tuples(cells, cells), max_size=8),
    raw=st.binary(max_size=200),
)
def test_catalogues(tmp_path_factory, kind, rows, raw):
    root = tmp_path_factory.mktemp("cat")
    (root / "a.png").write_bytes(PNG)
    path = root / f"rows.{kind}"
    if kind == "csv":
        import csv

        with open(path, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", "caption"])
            writer.writerows(rows)
        expected = len(rows)
    elif kind == "jsonl":
        lines = [json.dumps({"image": i, "caption": c}) for i, c in rows] + [
            raw.decode("latin-1").replace("\n", " ").replace("\r", " ")
        ]
        path.write_text("\n".join(lines) + "\n")
        expected = len(rows) + (1 if lines[-1].strip() else 0)
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({"image": [r[0] for r in rows], "caption": [r[1] for r in rows]}), path)
        expected = len(rows)
    entries = list(iter_catalogue(path, IngestConfig(catalogue_buckets=["ours"])))
    if kind == "csv":  # a cell with a newline spans lines, so count rows rather than lines
        expected = len(entries)
    assert len(entries) == expected  # every row kept or reported
    for entry in entries:
        assert isinstance(entry, Item | Skip)
        if isinstance(entry, Item) and entry.id.startswith("s3://"):
            assert entry.id.startswith("s3://ours/") and ".." not in entry.id.split("/")


urls = st.builds(
    lambda scheme, user, host, path, query: f"{scheme}://{user}{host}{path}{query}",
    st.sampled_from(["http", "https", "ftp", "file", "javascript", "s3"]),
    st.sampled_from(["", "u:p@", "user@", ":@"]),
    st.sampled_from(["example.com", "[::1]", "127.0.0.1:80", "[64:ff9b::7f00:1]", "[bad", "ex ample.com"]),
    st.text(max_size=15),
    st.sampled_from(["", "?X-Amz-Signature=s3cr3t&a=1", "?sig=s3cr3t", "?token=s3cr3t#frag"]),
)


@FUZZ
@given(url=urls, location=st.none() | urls | st.text(max_size=30))
def test_urls_and_redirects(url, location):
    for shown in (strip_credentials(url), strip_url_credentials(url)):
        assert "s3cr3t" not in shown and "u:p@" not in shown
    try:
        target = redirect_target(url, location, 302)
    except SkipItem as skip:
        assert skip.reason == "fetch_failed" and "s3cr3t" not in skip.detail
    else:
        assert target.split("://")[0] in ("http", "https")


@FUZZ
@given(
    overrides=st.lists(
        st.text(max_size=60)
        | st.builds(
            "{}={}".format,
            st.sampled_from(
                ["caption.template", "model.base", "ingest.sources", "train.rank", "sweep.grid", "name"]
            ),
            st.text(max_size=60),
        ),
        max_size=4,
    )
)
def test_config_overrides(overrides):
    try:
        config_from_dict({}, overrides)
        parse_overrides(overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc).strip() or "YAML" in str(exc)


@pytest.mark.parametrize("n", [EXAMPLES])
def test_fuzz_budget_is_set(n):
    assert n >= 1  # SDTUNE_FUZZ_EXAMPLES parsed; `make fuzz` raises it
