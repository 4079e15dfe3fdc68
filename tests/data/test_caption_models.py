"""Captioning with a model (tiny random BLIP, BLIP-2 and Florence-2: the words are nonsense, the plumbing
is real) and the training tokenizer's length check."""

from __future__ import annotations

import pytest
from data_helpers import (
    BLIP_WORDS,
    encode,
    pattern,
    tiny_blip,
    tiny_blip2,
    tiny_clip_tokenizer,
    tiny_florence2,
)
from pydantic import ValidationError

from sdtune.config import CaptionConfig, IngestConfig
from sdtune.data import captioners
from sdtune.data.caption import caption_dir
from sdtune.data.ingest import ingest
from sdtune.errors import ConfigError

pytest.importorskip("transformers")


@pytest.fixture
def five(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for i in range(5):
        (src / f"{i}.png").write_bytes(encode(pattern(seed=i), "PNG"))
    (src / "0.txt").write_text("my own words about a dog")
    ingest([str(src)], tmp_path / "ingested", IngestConfig(min_images=1, min_side=16))
    return tmp_path / "ingested"


def test_blip_captions_uncaptioned_images_in_batches(five, tmp_path, monkeypatch):
    calls = []
    real = captioners.BlipCaptioner.__call__

    def spy(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(captioners.BlipCaptioner, "__call__", spy)
    cfg = CaptionConfig(
        trigger="zwx", class_noun="dog", captioner="blip", captioner_model=str(tiny_blip(tmp_path / "blip")),
        batch_size=3, max_new_tokens=5, model_template="{trigger} {class_noun}, {caption}",
    )  # fmt: skip
    result = caption_dir(five, tmp_path / "cap", cfg)
    assert calls == [2, 2]  # batches of 3 records; the sidecar-captioned one needs no model
    assert result.records[0].caption == "my own words about a dog"
    for record in result.records[1:]:
        prefix, _, words = record.caption.partition(", ")
        assert prefix == "zwx dog" and 1 <= len(words.split()) <= 5
        assert set(words.split()) <= set(BLIP_WORDS) - {"[DEC]", "[PAD]", "[CLS]", "[SEP]"}
    transforms = [i.transforms for i in result.report.items]
    assert transforms == [["caption_sidecar"]] + [["caption_model"]] * 4
    assert result.report.summary["from_model"] == 4 and result.report.summary["from_sidecar"] == 1


@pytest.mark.parametrize(
    ("captioner", "build", "cls"),
    [
        ("blip2", tiny_blip2, captioners.Blip2Captioner),
        ("florence2", tiny_florence2, captioners.Florence2Captioner),
    ],
)
def test_blip2_and_florence2_caption_in_batches(five, tmp_path, monkeypatch, captioner, build, cls):
    calls = []
    real = cls.__call__

    def spy(self, images):
        calls.append(len(images))
        return real(self, images)

    monkeypatch.setattr(cls, "__call__", spy)
    cfg = CaptionConfig(
        trigger="zwx", class_noun="dog", captioner=captioner, captioner_model=str(build(tmp_path / captioner)),
        batch_size=3, max_new_tokens=4, model_template="{trigger} {class_noun}, {caption}",
    )  # fmt: skip
    result = caption_dir(five, tmp_path / "cap", cfg)
    assert calls == [2, 2]
    assert result.records[0].caption == "my own words about a dog"
    specials = {"[PAD]", "[CLS]", "[SEP]", "[UNK]", "<image>", "<s>", "</s>"}
    sources = [i.transforms for i in result.report.items]
    assert sources[0] == ["caption_sidecar"] and sources.count(["caption_model"]) >= 2
    for record, source in zip(result.records[1:], sources[1:], strict=True):
        if source == ["caption_template"]:  # the random model generated only special tokens
            assert record.caption == "a photo of zwx dog"
            continue
        prefix, _, words = record.caption.partition(", ")
        assert prefix == "zwx dog" and 1 <= len(words.split()) <= 4
        assert set(words.split()) <= set(BLIP_WORDS) - specials
    summary = result.report.summary
    assert summary["from_model"] == sources.count(["caption_model"]) and summary["captioner"] == captioner


def test_model_captioner_errors_name_the_class(five, tmp_path):
    (tmp_path / "empty").mkdir()
    for captioner, cls in (("blip2", "Blip2"), ("florence2", "Florence2")):
        cfg = CaptionConfig(captioner=captioner, captioner_model=str(tmp_path / "empty"))
        with pytest.raises(ConfigError, match=f"cannot load {cls}ForConditionalGeneration"):
            caption_dir(five, tmp_path / f"cap-{captioner}", cfg)
    assert captioners.clean_caption(" a\x00dog\n\ton  grass ") == "a dog on grass"


def test_bad_model_template_fails_before_loading(tmp_path):
    with pytest.raises(ValidationError, match="model_template"):
        CaptionConfig(captioner="blip", captioner_model=str(tmp_path / "nowhere"), model_template="{subject}")


def test_long_captions_are_cut_to_the_training_tokenizer(five, tmp_path):
    tiny_clip_tokenizer(tmp_path / "model" / "tokenizer")  # a diffusers-style folder works too
    long = "a photo of " + "red dog " * 40
    (tmp_path / "long.txt").write_text(long)
    cfg = CaptionConfig(tokenizer=str(tmp_path / "model"), max_tokens=20, template=long.strip())
    result = caption_dir(five, tmp_path / "cap", cfg)
    counter = captioners.TokenLimit(cfg)
    truncated = [i for i in result.report.items if i.reason == "caption_truncated"]
    assert len(truncated) == 4  # the template ones; the short sidecar fits
    assert truncated[0].status == "normalised" and "tokens > max_tokens=20" in truncated[0].detail
    for record in result.records[1:]:
        assert counter.count(record.caption) <= 20 and long.startswith(record.caption)
    assert result.records[0].caption == "my own words about a dog"
    assert result.report.summary["truncated"] == 4
    with pytest.raises(ConfigError, match="caption.tokenizer: folder not found"):
        caption_dir(five, tmp_path / "cap2", CaptionConfig(tokenizer=str(tmp_path / "none")))
