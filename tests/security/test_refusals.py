"""Each attack from the security review, reproduced, and refused: one line or a per-item skip, nothing touched.

Fast and offline (no servers); tests/security/test_registry_no_pickle.py covers the registry."""

from __future__ import annotations

import contextlib
import io
import os
import pickle
import time
from pathlib import Path

import pytest
from PIL import Image

from sdtune.config import (
    IngestConfig,
    RunConfig,
    config_from_dict,
    credential_settings,
    load_config,
    parse_overrides,
)
from sdtune.data.catalogue import iter_catalogue
from sdtune.data.items import Item, Skip
from sdtune.errors import ConfigError, DatasetError


def _png(size: int = 80) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise((size, size), 60).convert("RGB").save(buf, format="PNG")
    return buf.getvalue()


# 1. s3:// references with . / .. segments -------------------------------------------------------------


@pytest.mark.parametrize(
    "setting",
    [
        "model.base",
        "caption.captioner_model",
        "preprocess.upscaler_model",
        "preprocess.mask_model",
        "evaluate.clip_model",
        "train.checkpoint_dir",
        "ingest.sources",
    ],
)
@pytest.mark.parametrize("uri", ["s3://b/../../victim", "s3://bkt/./x", "s3://../x", "s3://k:secret@bkt/x"])
def test_s3_references_with_dot_segments_are_refused_in_the_config(setting, uri):
    value = [uri] if setting == "ingest.sources" else uri
    section, key = setting.split(".")
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        config_from_dict({section: {key: value}})


def test_s3_model_reference_cannot_empty_a_folder_outside_the_cache(tmp_path):
    """Repro: ``captioner_model: s3://b/../../../victim`` with a cache_dir emptied ``victim/`` before S3 was
    contacted (rmtree of cache_dir/bucket/prefix). The data-stage CLIs build the section alone, so the
    loader checks again."""
    from sdtune.data.hfmodels import resolve_weights
    from sdtune.models.loading import ModelLoadError

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "precious.txt").write_text("keep me")
    cache = tmp_path / "a" / "b"
    with pytest.raises(ModelLoadError) as info:
        resolve_weights("s3://b/../../../victim", "caption.captioner_model", str(cache))
    assert info.value.exit_code == 2 and "'.' and '..'" in str(info.value)
    # A symlink inside the cache is no way out either.
    (cache / "bkt").parent.mkdir(parents=True, exist_ok=True)
    (cache / "bkt").symlink_to(tmp_path)
    with pytest.raises(ModelLoadError, match="not inside cache_dir"):
        resolve_weights("s3://bkt/victim", "caption.captioner_model", str(cache))
    assert (victim / "precious.txt").read_text() == "keep me"


# 2. catalogue s3:// rows: an allowlist of buckets --------------------------------------------------------


def test_catalogue_rows_may_read_only_allowed_buckets(tmp_path):
    catalogue = tmp_path / "rows.csv"
    catalogue.write_text(
        "image,caption\ns3://other-tenant-private/faces/x.png,a\ns3://ours/set/y.png,b\ns3://ours/../z.png,c\n"
    )
    entries = list(iter_catalogue(catalogue, IngestConfig()))
    assert [(e.id, e.reason, e.detail) for e in entries if isinstance(e, Skip)][0] == (
        "s3://other-tenant-private/faces/x.png",
        "bad_row",
        "bucket not allowed (see ingest.catalogue_buckets)",
    )
    assert all(isinstance(e, Skip) for e in entries)  # no bucket allowed by default
    allowed = list(iter_catalogue(catalogue, IngestConfig(catalogue_buckets=["ours"])))
    assert [type(e).__name__ for e in allowed] == ["Skip", "Item", "Skip"]
    assert "'..'" in allowed[2].detail
    # The buckets of the run's own s3:// sources are allowed too.
    from_sources = list(iter_catalogue(catalogue, IngestConfig(), frozenset({"ours"})))
    assert isinstance(from_sources[1], Item)


# 3. credentials never stored ------------------------------------------------------------------------------

SIGNED = "https://example.com/set.zip?X-Amz-Credential=AKIA1&X-Amz-Signature=deadbeef&v=2"
WITH_PASSWORD = "https://alice:hunter2@example.com/photos.zip"


def _secret_config() -> RunConfig:
    return config_from_dict({"name": "s", "ingest": {"sources": [SIGNED, WITH_PASSWORD, "s3://ours/set/"]}})


def _assert_clean(text: str) -> None:
    for secret in ("deadbeef", "AKIA1", "hunter2", "alice"):
        assert secret not in text


def test_storable_config_strips_credentials_and_keeps_the_rest(tmp_path):
    cfg = _secret_config()
    assert credential_settings(cfg) == ["ingest.sources[0]", "ingest.sources[1]"]
    stored = cfg.storable()
    _assert_clean(stored.to_yaml())
    assert stored.ingest.sources == [
        "https://example.com/set.zip?v=2",
        "https://example.com/photos.zip",
        "s3://ours/set/",
    ]
    assert cfg.storable() is not cfg and RunConfig().storable() == RunConfig()

    # The stored copies: config.yaml beside the weights (logged to MLflow with them), MLflow params.
    from sdtune import tracking
    from sdtune.train.outputs import write_run_files

    class Result:
        def to_json(self):
            return {}

    with contextlib.suppress(Exception):  # the model card wants a real result; config.yaml is written first
        write_run_files(cfg, tmp_path, Result())
    _assert_clean((tmp_path / "config.yaml").read_text())
    cfg.evaluate.clip_model = "https://hub.example/clip?token=abc123"
    assert "abc123" not in str(tracking.flatten_params(cfg.model_dump(mode="json")))


def test_compiled_pipeline_and_katib_trials_refuse_a_config_with_credentials(tmp_path):
    from pipelines.compile import compile_pipeline

    with pytest.raises(ConfigError, match=r"ingest\.sources\[0\].*Kubernetes Secret"):
        compile_pipeline(_secret_config(), tmp_path / "p.yaml")
    assert not (tmp_path / "p.yaml").exists()
    from sdtune.sweep.katib import trial_job

    swept = _secret_config()
    swept.sweep.grid = {"train.rank": [4, 8]}
    with pytest.raises(ConfigError, match="Katib trial"):
        trial_job(swept, "sweep-1", "img", "ns")  # the trial template carries the config too


def test_job_args_carry_the_storable_config(tmp_path, monkeypatch):
    """The TrainJob/PyTorchJob args hold the config: stored in the cluster, so credentials are stripped."""
    from sdtune import steps

    seen = {}
    monkeypatch.setattr("sdtune.staging.upload_dir", lambda *a, **k: None)
    monkeypatch.setattr("sdtune.staging.download_prefix", lambda *a, **k: 1)
    monkeypatch.setattr("sdtune.cluster.launch_training", lambda cfg, **kw: seen.update(kw))
    cfg = _secret_config()
    cfg.cluster.train_image = "img"
    cfg.cluster.staging_uri = (
        "s3://mlpipeline/private-artifacts/team/sdtune/staging"  # as compile resolves it
    )
    assert steps._train_as_job(cfg, tmp_path, tmp_path / "out", "mlflow-run", "job-run") == 0
    _assert_clean(" ".join(seen["args"]))


# 6. IPv6 forms that carry 127.0.0.1 ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host",
    [
        "64:ff9b::7f00:1",
        "64:ff9b:1::7f00:1",
        "2002:7f00:1::",
        "::7f00:1",
        "::ffff:7f00:1",
        "2001:0:4136:e378:8000:63bf:80ff:fffe",
    ],
)
def test_ipv6_forms_embedding_loopback_are_blocked(host):
    from sdtune.data.fetch import FetchPolicy, fetch_bytes
    from sdtune.data.reasons import SkipItem

    with pytest.raises(SkipItem) as info:
        fetch_bytes(f"http://[{host}]:9/x.png", FetchPolicy(max_bytes=1000, connect_timeout_s=1, retries=0))
    assert info.value.reason == "blocked_address" and "127.0.0.1" in info.value.detail


# 7. templates, YAML budgets, tiny --out, special files, Markdown, captions, 16-bit, pickles ------------------


@pytest.mark.parametrize(
    "template",
    [
        "{trigger:>99999999}",
        "{trigger.__class__.__mro__}",
        "{trigger[0]}",
        "{trigger!r}",
        "{0}",
        "{}",
        "{nope}",
        "{",
    ],
)
@pytest.mark.parametrize("setting", ["caption.template", "caption.model_template", "train.class_prompt"])
def test_templates_allow_plain_fields_only(template, setting):
    section, key = setting.split(".")
    with pytest.raises(ConfigError, match=setting.replace(".", r"\.")):
        config_from_dict({section: {key: template}})
    with pytest.raises(ConfigError, match="evaluate.prompts"):
        config_from_dict({"evaluate": {"prompts": ["ok {trigger}", template]}})


def test_plain_templates_still_work():
    cfg = config_from_dict(
        {
            "caption": {
                "template": "{{literal}} {trigger} {class_noun}",
                "model_template": "{caption}, {trigger}",
            }
        }
    )
    assert cfg.format_prompt(cfg.caption.template) == "{literal} sks person"


BILLION_LAUGHS = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n" + "".join(
    f"{chr(98 + i)}: &{chr(98 + i)} [*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},"
    f"*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)},*{chr(97 + i)}]\n"
    for i in range(8)
)


def test_billion_laughs_is_refused_in_one_line(tmp_path):
    path = tmp_path / "bomb.yaml"
    path.write_text(BILLION_LAUGHS)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases"):
        load_config(path)
    with pytest.raises(ConfigError, match="aliases"):
        parse_overrides(["sweep.grid=" + BILLION_LAUGHS.replace("\n", ", ").join("{}")])
    recursive = tmp_path / "rec.yaml"
    recursive.write_text("a: &a [*a]\n")
    with pytest.raises(ConfigError, match="itself"):
        load_config(recursive)
    big = tmp_path / "big.yaml"
    big.write_text("name: " + "x" * (5 << 20))
    with pytest.raises(ConfigError, match="limit"):
        load_config(big)
    assert time.perf_counter() - start < 10  # refused from the parse tree, never expanded
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(_write(tmp_path / "py.yaml", "name: !!python/object/apply:os.system ['true']\n"))


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_models_tiny_refuses_a_foreign_non_empty_folder(tmp_path):
    from sdtune.models.tiny import build_tiny

    (tmp_path / "mine.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not empty"):
        build_tiny("sd15", tmp_path)
    assert (tmp_path / "mine.txt").read_text() == "keep"


@pytest.mark.timeout(60)
def test_named_pipe_in_a_folder_is_skipped_not_read(tmp_path):
    from sdtune.data.ingest import ingest

    src = tmp_path / "src"
    src.mkdir()
    for i in range(2):
        (src / f"img{i}.png").write_bytes(_png())
    os.mkfifo(src / "pipe.png")  # reading it would block for ever: no writer
    result = ingest([str(src)], tmp_path / "out", IngestConfig(min_images=2, near_duplicate_distance=None))
    assert result.report.reasons == {"special_file": 1}
    from sdtune.data.localfiles import file_reader
    from sdtune.data.reasons import SkipItem

    with pytest.raises(SkipItem, match="special_file"):  # the reader checks again after opening
        file_reader(src / "pipe.png", 1000)()
    catalogue = src / "rows.csv"
    catalogue.write_text("image\npipe.png\n")
    assert [(e.reason, e.detail) for e in iter_catalogue(catalogue, IngestConfig())] == [
        ("special_file", "not a regular file")
    ]
    with pytest.raises(DatasetError, match="is a FIFO"):
        ingest([str(src / "pipe.png")], tmp_path / "out2", IngestConfig(min_images=1))


def test_markdown_report_cannot_be_broken_out_of():
    from markdown_it import MarkdownIt

    from sdtune.manifest import ItemReport, StageReport, report_markdown

    report = StageReport(stage="ingest")
    evil = "a.zip!x`![pwned](http://evil.example/p.png)`<img src=x>|.png"
    report.add(
        ItemReport(item=evil, status="skipped", reason="corrupt", detail="[click](http://evil.example) <b>")
    )
    rendered = MarkdownIt("commonmark").enable("table").render(report_markdown(report.finalise()))
    assert "<img" not in rendered and "<a " not in rendered and "<b>" not in rendered
    assert "pwned" in rendered  # shown as text


def test_every_catalogue_caption_is_capped(tmp_path):
    catalogue = tmp_path / "rows.jsonl"
    catalogue.write_text('{"image": "x.png", "caption": "' + "é" * 1_000_000 + '"}\n')
    (tmp_path / "x.png").write_bytes(_png())
    (item,) = iter_catalogue(catalogue, IngestConfig())
    assert len(item.caption.encode()) <= 4096


def test_16_bit_image_memory_is_bounded(tmp_path):
    """A 16-bit greyscale PNG of 16 megapixels: the conversion held ~17 bytes per pixel in float64 copies
    (1.2 GB of RSS for a 123 KB file at 63 megapixels). tracemalloc sees numpy's buffers (not Pillow's)."""
    import tracemalloc

    import numpy as np

    from sdtune.data.images import decode_image

    side = 4000
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG", compress_level=1)
    del ramp
    tracemalloc.start()
    try:
        decoded = decode_image(buf.getvalue(), max_pixels=64_000_000)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Kept: the 16-bit array (2 B/px), the 8-bit result (1) and one float32 block; was 17 B/px.
    assert decoded.image.mode == "RGB" and "scale_16bit" in decoded.transforms
    assert peak / (side * side) < 6, peak / (side * side)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch /tmp/sdtune-pwned-by-pickle",))


def test_pickled_optimizer_state_is_a_clean_refusal(tmp_path):
    import torch

    from sdtune.errors import CheckpointError
    from sdtune.train import checkpoint as C

    folder = tmp_path / "step_000010"
    folder.mkdir()
    (folder / C.OPTIM).write_bytes(pickle.dumps({"optimizer": _RunsCode()}))
    torch.save({"lr": torch.tensor(1.0)}, folder / C.RNG)
    found = C.Found(location=str(folder), folder=folder, meta={"step": 10})
    with pytest.raises(CheckpointError, match="optimizer.pt refused") as info:
        C._load_pickled_state(found, C.OPTIM)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    assert not Path("/tmp/sdtune-pwned-by-pickle").exists()
    assert C._load_pickled_state(found, C.RNG)["lr"].item() == 1.0  # plain tensors still load
