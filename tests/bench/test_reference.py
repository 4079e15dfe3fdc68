"""The reference loop does the trainer's math: same first losses from the same seed, model and data."""

from __future__ import annotations

import json
import math

from sdtune.bench.__main__ import baseline_of, parse_task_times, row_keys
from sdtune.bench.reference import ReferenceLoRA
from sdtune.bench.setups import write_config
from sdtune.config import load_config
from tests.train.conftest import stage_dir, tiny_sd15  # noqa: F401 (session fixtures)


def test_reference_matches_the_trainer(tmp_path, tiny_sd15, stage_dir):  # noqa: F811
    from sdtune.train.lora import train

    config = write_config(tmp_path / "config.yaml", tiny_sd15, 64)
    cfg = load_config(config, ["train.max_steps=3", "train.log_every=3"])
    ref = ReferenceLoRA.build(cfg, stage_dir)
    before = [p.detach().clone() for p in ref.params]
    losses = ref.run(3)
    assert all(math.isfinite(x) for x in losses)
    assert any(not (a == b).all() for a, b in zip(before, ref.params, strict=True))  # the LoRA trained

    result = train(cfg, stage_dir, tmp_path / "out")
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["step"] == 3
    # Same init, data order and random draws: equal up to rounding (not merely "within noise"). AdamW amplifies
    # fp32 round-off on near-zero gradients: 3 steps differ by up to ~3e-4 relative, depending on the weights.
    assert abs(result.final_loss - sum(losses) / 3) < 1e-3 * abs(result.final_loss)


def test_parse_task_times():
    log = (
        "14:37:47.573 - INFO - Executing task \x1b[96m'start-run-op'\x1b[0m\n"
        "14:37:58.090 - INFO - Task \x1b[96m'start-run-op'\x1b[0m finished with status \x1b[92mSUCCESS\x1b[0m\n"
        "23:59:59.500 - INFO - Executing task 'train-op'\n"
        "00:00:01.000 - INFO - Task 'train-op' finished with status SUCCESS\n"
    )
    assert parse_task_times(log) == {"start-run-op": 10.517, "train-op": 1.5}
    assert parse_task_times("running …\n  ✓ ingest     8.6 s\n  ✓ train-x   48.6 s\n") == {
        "ingest": 8.6,
        "train-x": 48.6,
    }


def test_bf16_rows_are_compared_with_the_bf16_reference():
    # The rows `python -m sdtune.bench --compile default --bf16` produces.
    variants = ["trainer+compile=default"]
    variants += [f"{v}+bf16" for v in ("trainer", *variants, "reference")]
    rows = row_keys(variants)
    assert rows == [
        "trainer",
        "compile=default",
        "bf16",
        "compile=default+bf16",
        "reference+bf16",
        "reference",
    ]
    assert {r: baseline_of(r, rows) for r in rows[:-1]} == {
        "trainer": "reference",
        "compile=default": "reference",
        "bf16": "reference+bf16",
        "compile=default+bf16": "reference+bf16",
        "reference+bf16": "reference",  # what bf16 gives the reference itself
    }
    # Without a bf16 reference row (results written before it existed) a bf16 row is against fp32.
    assert baseline_of("bf16", ["trainer", "bf16", "reference"]) == "reference"
