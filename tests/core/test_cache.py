"""Content-addressed caching: unchanged content hits, any changed input misses, paths don't matter."""

import shutil

from mlflow.tracking import MlflowClient

from sdtune import cache, steps, tracking
from sdtune.config import RunConfig
from sdtune.data.sample import write_sample_dataset


def test_tree_digest_follows_content_not_location(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    (a / "sub").mkdir(parents=True)
    (a / "sub" / "x.bin").write_bytes(b"1" * 5000)
    shutil.copytree(a, b)
    assert cache.tree_digest(a) == cache.tree_digest(b)
    assert cache.tree_digest(a, sample_bytes=100) == cache.tree_digest(b, sample_bytes=100)
    (b / "sub" / "x.bin").write_bytes(b"1" * 4999 + b"2")
    assert cache.tree_digest(a) != cache.tree_digest(b)
    assert cache.tree_digest(a, sample_bytes=100) != cache.tree_digest(b, sample_bytes=100)


def test_store_and_restore(tmp_path):
    store = cache.StepCache(tmp_path / "cache")
    out = tmp_path / "out"
    out.mkdir()
    (out / "w.safetensors").write_bytes(b"w")
    key = cache.step_key("train", data="d1")
    assert store.restore("train", key, tmp_path / "r0") is None
    store.store("train", key, out, {"loss": 0.5})
    assert store.restore("train", key, tmp_path / "r1") == {"loss": 0.5}
    assert (tmp_path / "r1" / "w.safetensors").read_bytes() == b"w"
    assert cache.step_key("train", data="d2") != key
    # a torn entry (no completion marker) is never used
    torn = tmp_path / "cache" / "train" / cache.step_key("train", data="torn")
    (torn / "output").mkdir(parents=True)
    assert store.restore("train", torn.name, tmp_path / "r2") is None


def test_url_sources_are_never_cached():
    assert cache.source_digest("https://example.com/photos.zip") is None


def _ingest_tags(parent: str) -> list[str]:
    client = MlflowClient(tracking.tracking_uri(), registry_uri=tracking.tracking_uri())
    run = client.get_run(parent)
    children = client.search_runs([run.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'")
    return [c.data.tags["sdtune.cache"] for c in children]


def test_ingest_hits_on_same_content_and_misses_on_new_images(sdtune_home, tmp_path):
    photos = tmp_path / "photos"
    write_sample_dataset(photos, count=8)
    cfg = RunConfig(name="cache")
    cfg.ingest.sources = [str(photos)]
    text = cfg.to_param()

    def ingest_once(tag: str) -> tuple[str, dict]:
        parent = tracking.start_parent_run("cache", tag, {})
        summary = steps.ingest_step(text, parent, tmp_path / tag)
        return _ingest_tags(parent)[0], summary

    assert ingest_once("first")[0] == "miss"
    status, summary = ingest_once("again")
    assert status == "hit" and summary["images"] == 8
    assert (tmp_path / "again" / "manifest.jsonl").read_bytes() == (
        tmp_path / "first" / "manifest.jsonl"
    ).read_bytes()

    # same folder path, one new image under it: must not hit the stale entry
    write_sample_dataset(tmp_path / "more", count=9)
    extra = sorted(p for p in (tmp_path / "more").iterdir() if p.suffix != ".txt")[-1]
    shutil.copy(extra, photos / f"new{extra.suffix}")
    status, summary = ingest_once("changed")
    assert status == "miss" and summary["images"] == 9
