"""Fixtures for training tests: the tiny models (built once per session) and a small captioned stage dir."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from sdtune.manifest import Record, StageReport, sha256_file, write_stage


@pytest.fixture(scope="session")
def tiny_sd15(tmp_path_factory) -> Path:
    from sdtune.models.tiny import build_tiny

    return build_tiny("sd15", tmp_path_factory.mktemp("models") / "tiny-sd15")


@pytest.fixture(scope="session")
def tiny_sdxl(tmp_path_factory) -> Path:
    from sdtune.models.tiny import build_tiny

    return build_tiny("sdxl", tmp_path_factory.mktemp("models") / "tiny-sdxl")


@pytest.fixture(scope="session")
def tiny_sd2(tmp_path_factory) -> Path:
    from sdtune.models.tiny import build_tiny

    return build_tiny("sd2", tmp_path_factory.mktemp("models") / "tiny-sd2")


@pytest.fixture(scope="session")
def tiny_inpaint(tmp_path_factory) -> Path:
    from sdtune.models.tiny import build_tiny

    return build_tiny("sd15-inpaint", tmp_path_factory.mktemp("models") / "tiny-sd15-inpaint")


@pytest.fixture(scope="session")
def tiny_sd3(tmp_path_factory) -> Path:
    from sdtune.models.tiny import build_tiny

    return build_tiny("sd3", tmp_path_factory.mktemp("models") / "tiny-sd3")


def make_stage(out: Path, n: int = 5, holdout: int = 1, size: int = 64) -> Path:
    """``n`` coloured-blob PNGs, the last ``holdout`` of them in the holdout split."""
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        arr = np.full((size, size, 3), (230, 230, 220), np.uint8)
        x, y = rng.integers(0, size // 2, 2)
        arr[y : y + size // 2, x : x + size // 3] = (240, 120, 30)  # an orange "robot body"
        path = out / f"img_{i:03d}.png"
        Image.fromarray(arr).save(path)
        records.append(
            Record(
                file=path.name,
                caption="a photo of sks toy robot",
                width=size,
                height=size,
                sha256=sha256_file(path),
                source=f"test://{i}",
                split="holdout" if i >= n - holdout else "train",
            )
        )
    write_stage(out, records, StageReport(stage="caption"))
    return out


@pytest.fixture(scope="session")
def stage_dir(tmp_path_factory) -> Path:
    return make_stage(tmp_path_factory.mktemp("stage") / "captioned")


def write_config(path: Path, base: Path, **sections) -> Path:
    data = {
        "model": {"base": str(base), "arch": "sd15"},
        "preprocess": {"resolution": 64},
        "caption": {"trigger": "sks", "class_noun": "toy robot"},
        "train": {"max_steps": 4, "learning_rate": 3e-2, "log_every": 2},
        "evaluate": {
            "prompts": ["a photo of {trigger} {class_noun}", "a painting of {trigger} {class_noun}"],
            "seeds": [0, 1],
            "num_inference_steps": 2,
            "loss_seeds": [0],
            "loss_timesteps": [200, 600],
        },
    }
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


@pytest.fixture
def tiny_config(tmp_path, tiny_sd15) -> Path:
    return write_config(tmp_path / "config.yaml", tiny_sd15)


def load_quiet(pipeline_cls, base: Path):
    """``pipeline_cls`` from the local folder ``base``, without progress bars."""
    pipe = pipeline_cls.from_pretrained(base, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def assert_same_image(got, want) -> None:
    """Equal to float round-off: for pipelines that hold bit-identical weights loaded in different ways (a
    single file, a diffusers folder). BLAS kernels pick their path by the tensors' memory alignment, which
    differs between loaders: on an AMD EPYC an SDXL image came out 1.1e-6 apart (bit-equal once every
    parameter was re-allocated). A wrong or missing tensor moves an image by more than 1e-3."""
    import torch

    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def sample(pipe, prompt: str = "a photo of sks toy robot", **extra):
    """One 64 px image in 2 steps from seed 0, as a tensor: enough to tell whether weights changed it.
    ``extra``: the pipeline's own inputs (an inpainting image and mask, a guidance scale)."""
    import torch

    return pipe(
        prompt,
        **extra,
        num_inference_steps=2,
        height=64,
        width=64,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
    ).images


def evaluate_run(config: Path, data: Path, trained: Path, out: Path, *overrides: str) -> dict:
    """``sdtune evaluate`` of a training output through the CLI; its ``metrics.json``."""
    import json

    from sdtune.cli import main

    args = [
        "evaluate",
        "--config",
        str(config),
        "--data",
        str(data),
        "--lora",
        str(trained),
        "--out",
        str(out),
    ]
    assert main([*args, *overrides]) == 0
    return json.loads((Path(out) / "metrics.json").read_text())
