"""A three-step stand-in pipeline that goes through apply_task_settings like the real one does."""
# No `from __future__ import annotations`: kfp reads the component annotations as real types.

from pathlib import Path

from kfp import compiler, dsl

from pipelines.cluster import apply_task_settings
from sdtune.config import RunConfig


@dsl.component(base_image="python:3.11-slim", install_kfp_package=False)
def _step(config: str) -> str:
    return config


def build(cfg: RunConfig):
    @dsl.pipeline(name="sdtune-stub")
    def stub(config: str = "{}"):
        prep = apply_task_settings(_step(config=config).set_display_name("preprocess"), "preprocess", cfg)
        train = apply_task_settings(_step(config=prep.output).set_display_name("train"), "train", cfg)
        apply_task_settings(_step(config=train.output).set_display_name("register"), "register", cfg)

    return stub


def compile_stub(cfg: RunConfig, out_path: Path) -> Path:
    compiler.Compiler().compile(build(cfg), package_path=str(out_path))
    return Path(out_path)
