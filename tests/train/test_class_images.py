"""``train.class_data_dir``: supplied class images are checked before DreamBooth uses them."""

from __future__ import annotations

import pytest
from PIL import Image

from sdtune.errors import ConfigError
from sdtune.train.class_images import supplied_images


def test_unreadable_class_images_are_skipped_with_a_warning(tmp_path):
    Image.new("RGB", (16, 16), "red").save(tmp_path / "b.png")
    (tmp_path / "a.png").write_text("not an image")  # was a PIL.UnidentifiedImageError traceback mid-run
    (tmp_path / "notes.txt").write_text("ignored: not an image suffix")
    with pytest.warns(UserWarning, match="class image a.png skipped: unreadable"):
        assert supplied_images(tmp_path) == [tmp_path / "b.png"]


def test_a_missing_class_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"train.class_data_dir .*nope: not found"):  # was FileNotFoundError
        supplied_images(tmp_path / "nope")
