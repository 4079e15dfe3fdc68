"""A 4-trial sweep through kfp.local on the tiny model, parallelism 2: one trial fails (within max-failed),
the best of the others by the metric is registered, everything is tracked, the comparison page renders."""

from __future__ import annotations

import os
import subprocess
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import sdtune_cli
from tests.sweep.chromium import assert_renders

pytestmark = pytest.mark.slow


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return sdtune_cli(*args, env=env, timeout=900)


def test_local_sweep_picks_and_registers_the_best(tiny_assets, tmp_path):
    home = tmp_path / "home"
    env = dict(os.environ, SDTUNE_HOME=str(home), OMP_NUM_THREADS="1", COLUMNS="200")
    env.pop("MLFLOW_TRACKING_URI", None)
    started = time.monotonic()
    done = _cli(
        "sweep",
        "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}",
        f"ingest.sources=[{tiny_assets['data']}]",
        "train.max_steps=4",
        "evaluate.num_inference_steps=2",
        "evaluate.seeds=[0]",
        "evaluate.loss_seeds=[0]",
        "evaluate.loss_timesteps=[300,700]",
        "tracking.experiment=sweep-e2e",
        "register.model_name=sweep-lora",
        "--grid",
        "train.learning_rate=3e-2,1e-2,3e-3",
        "--trial",
        "train.target_modules=[no_such_module]",  # valid config, fails in training
        "--metric",
        "loss_tuned_trigger",
        "--direction",
        "minimize",
        "--parallelism",
        "2",
        "--max-failed",
        "1",
        "--sweep-id",
        "sweep-e2e-1",
        "--local",
        "--pipeline-root",
        str(tmp_path / "root"),
        env=env,
    )
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "sdtune sweep finished" in done.stdout
    print(f"4-trial local sweep: {seconds:.0f} s")

    uri = f"sqlite:///{home / 'mlflow.db'}"
    client = MlflowClient(uri, registry_uri=uri)
    experiment = client.get_experiment_by_name("sweep-e2e")
    runs = client.search_runs([experiment.experiment_id], "tags.`sdtune.sweep_id` = 'sweep-e2e-1'")
    parents = [r for r in runs if r.data.tags.get("sdtune.role") == "parent"]
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("sdtune.role") == "trial"}
    assert len(parents) == 1 and len(trials) == 4
    parent = parents[0]
    assert parent.info.status == "FINISHED"
    assert all(t.data.tags["mlflow.parentRunId"] == parent.info.run_id for t in trials.values())

    failed = trials["trial-003"]
    assert failed.info.status == "FAILED" and "no_such_module" in failed.data.tags["sdtune.error"]
    finished = {n: r for n, r in trials.items() if r.info.status == "FINISHED"}
    assert set(finished) == {"trial-000", "trial-001", "trial-002"}
    best = min(finished.values(), key=lambda r: r.data.metrics["loss_tuned_trigger"])
    assert best.data.tags["sdtune.best_trial"] == "true"
    assert sum(r.data.tags.get("sdtune.best_trial") == "true" for r in trials.values()) == 1
    assert parent.data.tags["sdtune.best_trial_run"] == best.info.run_id
    assert parent.data.metrics["loss_tuned_trigger"] == best.data.metrics["loss_tuned_trigger"]
    assert best.data.params["train.learning_rate"] in ("0.03", "0.01", "0.003")
    # each trial nests its own train and evaluate runs; the evaluate run holds the grid
    children = {
        r.info.run_name
        for r in client.search_runs(
            [experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{best.info.run_id}'"
        )
    }
    assert children == {"train", "evaluate"}

    # the best trial's model is registered through the gate (first version: promoted)
    version = client.get_model_version_by_alias("sweep-lora", "candidate")
    assert version.tags["metric.loss_tuned_trigger"] == repr(best.data.metrics["loss_tuned_trigger"])
    assert str(client.get_model_version_by_alias("sweep-lora", "champion").version) == str(version.version)
    assert parent.data.tags["sdtune.model_version"] == str(version.version)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")} >= {"sweep/comparison.html"}

    # the page emitted as the KFP HTML artifact renders with every trial's grid
    pages = list((tmp_path / "root").glob("sdtune-sweep-*/select-best-op/comparison"))
    assert len(pages) == 1
    page = tmp_path / "comparison.html"
    page.write_bytes(pages[0].read_bytes())
    assert_renders(page, tmp_path, min_images=3)

    # `sdtune sweeps show` lists the trials sorted by the metric, best first
    shown = _cli("sweeps", "show", "sweep-e2e-1", "--experiment", "sweep-e2e", env=env)
    assert shown.returncode == 0, shown.stderr
    order = [line.split("│")[3].strip() for line in shown.stdout.splitlines() if "trial-" in line]
    expected = sorted(finished, key=lambda n: finished[n].data.metrics["loss_tuned_trigger"]) + ["trial-003"]
    assert order == expected
    assert "★" in next(line for line in shown.stdout.splitlines() if best.info.run_name in line)

    # ... and so does `sdtune runs compare --sweep`
    compared = _cli("runs", "compare", "--sweep", "sweep-e2e-1", "--experiment", "sweep-e2e", env=env)
    assert compared.returncode == 0, compared.stderr
    assert [
        line.split("│")[3].strip() for line in compared.stdout.splitlines() if "trial-" in line
    ] == expected
