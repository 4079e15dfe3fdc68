"""Search-space expansion (grid, random ranges, prompt files, extra trials) and best-trial selection."""

from __future__ import annotations

import math

import pytest

from sdtune.cli.sweep import sweep_config
from sdtune.config import RunConfig, load_config
from sdtune.errors import ConfigError
from sdtune.sweep import (
    SweepFailed,
    Trial,
    TrialResult,
    build_trials,
    parse_grid_option,
    select_best,
    trial_config,
)
from sdtune.sweep.space import parse_trial_option, split_values
from sdtune.sweep.trial import failure_reason


def _cfg(**sweep) -> RunConfig:
    return RunConfig.model_validate({"sweep": sweep})


def test_grid_is_every_combination_in_a_stable_order():
    grid, ranges = parse_grid_option(["train.learning_rate=1e-4,5e-5", "train.rank=4,16"])
    assert grid == {"train.learning_rate": [1e-4, 5e-5], "train.rank": [4, 16]} and ranges == {}
    trials = build_trials(_cfg(grid=grid))
    assert [t.overrides for t in trials] == [
        {"train.learning_rate": 1e-4, "train.rank": 4},
        {"train.learning_rate": 1e-4, "train.rank": 16},
        {"train.learning_rate": 5e-5, "train.rank": 4},
        {"train.learning_rate": 5e-5, "train.rank": 16},
    ]
    assert [t.name for t in trials] == ["trial-000", "trial-001", "trial-002", "trial-003"]
    assert trial_config(RunConfig(), trials[3]).train.rank == 16
    assert trial_config(RunConfig(), trials[3]).train.learning_rate == 5e-5
    assert Trial.from_json(trials[1].to_json()) == trials[1]
    assert "\n" not in trials[1].to_json()


def test_values_split_on_top_level_commas_only():
    assert split_values("[to_q,to_v],[to_k], 'a,b'") == ["[to_q,to_v]", "[to_k]", "'a,b'"]
    grid, _ = parse_grid_option(
        ["train.target_modules=[to_q,to_v],[to_k]", "train.lr_scheduler=constant,cosine"]
    )
    assert grid["train.target_modules"] == [["to_q", "to_v"], ["to_k"]]
    assert grid["train.lr_scheduler"] == ["constant", "cosine"]
    # YAML 1.1 leaves "1e-4" a string; sweep values become numbers (yaml presets too)
    assert build_trials(_cfg(grid={"train.learning_rate": ["1e-4"]}))[0].overrides == {
        "train.learning_rate": 1e-4
    }


def test_random_search_is_seeded_and_within_ranges():
    grid, ranges = parse_grid_option(
        [
            "train.learning_rate=loguniform:1e-5:1e-3",
            "train.rank=int:2:8",
            "train.lr_scheduler=constant,cosine",
        ]
    )
    assert set(ranges) == {"train.learning_rate", "train.rank"}
    cfg = _cfg(grid=grid, ranges=ranges, algorithm="random", max_trials=12, seed=3)
    first, again = build_trials(cfg), build_trials(cfg)
    assert [t.overrides for t in first] == [t.overrides for t in again] and len(first) == 12
    for t in first:
        assert 1e-5 <= t.overrides["train.learning_rate"] <= 1e-3
        assert isinstance(t.overrides["train.rank"], int) and 2 <= t.overrides["train.rank"] <= 8
        assert t.overrides["train.lr_scheduler"] in ("constant", "cosine")
    logs = [math.log10(t.overrides["train.learning_rate"]) for t in first]
    assert max(logs) - min(logs) > 0.8  # spread over the decades, not bunched at the top
    other = build_trials(cfg.model_copy(update={"sweep": cfg.sweep.model_copy(update={"seed": 4})}))
    assert [t.overrides for t in other] != [t.overrides for t in first]


def test_prompt_variants_are_one_more_dimension(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# caption templates\na photo of {trigger} {class_noun}\n\n{trigger} {class_noun}, studio light\n"
    )
    cfg = sweep_config(RunConfig(), grid=["train.rank=4,8"], prompts=prompts)
    trials = build_trials(cfg)
    assert len(trials) == 4
    assert trials[1].overrides == {
        "train.rank": 4,
        "caption.template": "{trigger} {class_noun}, studio light",
    }
    assert trial_config(cfg, trials[1]).caption.template == "{trigger} {class_noun}, studio light"
    cfg = sweep_config(RunConfig(), prompts=prompts, prompt_key="evaluate.prompts")
    with pytest.raises(ConfigError, match="evaluate.prompts"):  # a list key needs list values
        build_trials(cfg)
    with pytest.raises(ConfigError, match="is a folder: name a text file"):  # it said "not found"
        sweep_config(RunConfig(), prompts=tmp_path)


def test_random_option_switches_to_random_search():
    cfg = sweep_config(
        RunConfig(),
        grid=["train.learning_rate=loguniform:1e-5:1e-3"],
        random_trials=3,
        metric="loss_delta_trigger",
        max_failed=1,
        parallelism=3,
    )
    assert cfg.sweep.algorithm == "random" and cfg.sweep.max_trials == 3 and cfg.sweep.max_failed == 1
    assert len(build_trials(cfg)) == 3


@pytest.mark.parametrize(
    ("grid", "match"),
    [
        (["ingest.sources=[a],[b]"], "only keys under"),
        (["train.no_such_key=1,2"], "no such config key"),
        (["train.rank=0,4"], "train.rank"),  # validated before anything runs
        (["train.learning_rate=loguniform:1e-5:1e-3"], "need random search"),
        (["train.learning_rate=loguniform:0:1e-3"], "LOW > 0"),
        (["train.rank=int:8:2"], "LOW must be below HIGH"),
        (["train.rank"], "expected KEY"),
    ],
)
def test_bad_search_spaces_fail_before_launch(grid, match):
    with pytest.raises(ConfigError, match=match):
        build_trials(sweep_config(RunConfig(), grid=grid))


def test_nothing_to_sweep_and_extra_trials():
    with pytest.raises(ConfigError, match="nothing to sweep"):
        build_trials(RunConfig())
    extra = [parse_trial_option("train.rank=8 train.learning_rate=1e-4")]
    trials = build_trials(_cfg(grid={"train.rank": [4]}), extra)
    assert [t.overrides for t in trials] == [
        {"train.rank": 4},
        {"train.rank": 8, "train.learning_rate": 1e-4},
    ]


def test_the_shipped_demo_config_sweeps():
    cfg = load_config("configs/debug/tiny_cpu.yaml", ["sweep.grid={train.learning_rate: [3e-2, 1e-2]}"])
    assert [t.overrides["train.learning_rate"] for t in build_trials(cfg)] == [3e-2, 1e-2]


def _r(index, value=None, status="FINISHED", error=""):
    metrics = {} if value is None else {"loss_tuned_trigger": value, "clip_i": -value}
    return TrialResult(index, f"trial-{index:03d}", {"train.rank": index}, status, metrics, error)


def test_select_best_by_direction_ties_and_failures():
    results = [_r(0, 0.5), _r(1, 0.3), _r(2, 0.3), _r(3, status="FAILED", error="boom")]
    assert (
        select_best(results, "loss_tuned_trigger", "minimize", max_failed=1).name == "trial-001"
    )  # tie: lower index
    assert select_best(results, "clip_i", "maximize", max_failed=1).name == "trial-001"
    assert select_best(results[:3], "loss_tuned_trigger", "maximize", max_failed=0).name == "trial-000"
    with pytest.raises(SweepFailed, match="1 of 4 trials failed.*trial-003: boom"):
        select_best(results, "loss_tuned_trigger", "minimize", max_failed=0)
    with pytest.raises(SweepFailed, match="no trial has metric 'clip_t'"):
        select_best(results[:3], "clip_t", "minimize", max_failed=0)
    with pytest.raises(SweepFailed):
        select_best([_r(0, status="FAILED")], "loss_tuned_trigger", "minimize", max_failed=5)
    # a NaN metric never wins
    assert (
        select_best([_r(0, float("nan")), _r(1, 9.0)], "loss_tuned_trigger", "minimize", 0).name
        == "trial-001"
    )
    # results survive the JSON trip through dsl.Collected (ints may come back as floats)
    raw = {**TrialResult.from_json(results[1].to_json()).__dict__, "index": 1.0}
    assert TrialResult.from_json(raw) == results[1]


def test_failure_reason_names_the_child_error():
    tail = [
        "Traceback (most recent call last):",
        '  File "x.py", line 1',
        "ValueError: Target modules {'nope'} not found",
    ]
    reason = failure_reason(RuntimeError("training exited with code 1"), tail)
    assert (
        reason == "RuntimeError: training exited with code 1 (ValueError: Target modules {'nope'} not found)"
    )
    assert failure_reason(RuntimeError("x"), ["error: bad data"]) == "RuntimeError: x (error: bad data)"
