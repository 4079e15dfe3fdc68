"""Compile pipelines to KFP IR YAML (what `sdtune compile`, `submit` and `schedule` upload)."""

from pathlib import Path

from kfp import compiler

from pipelines.personalize import build_personalize_pipeline
from sdtune.cluster.placement import check_s3_prefixes
from sdtune.config import RunConfig


def compile_pipeline(cfg: RunConfig, out_path: Path) -> Path:
    # Before anything is written: a run whose S3 writes the namespace's keys would be denied fails here.
    check_s3_prefixes(cfg, cfg.cluster.namespace)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_personalize_pipeline(cfg), package_path=str(out_path))
    return out_path
