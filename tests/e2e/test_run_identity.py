"""`sdtune run --local` runs that share a folder keep to their own results, and Ctrl-C closes a run cleanly.

Lean on purpose (tiny model, 4 steps, one sample seed): these tests are about identity and signals, not
training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import REPO_ROOT

pytestmark = pytest.mark.slow

QUICK = (
    "train.max_steps=4",
    "evaluate.seeds=[0]",
    "evaluate.num_inference_steps=2",
    "evaluate.loss_timesteps=[500]",
    "evaluate.loss_seeds=[0]",
)


def _args(assets, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "sdtune.cli",
        "run",
        "--local",
        str(REPO_ROOT / "configs/debug/tiny_cpu.yaml"),
        f"model.base={assets['model']}",
        f"ingest.sources=[{assets['data']}]",
        *QUICK,
        *extra,
    ]


def _env(home) -> dict:
    env = dict(os.environ, SDTUNE_HOME=str(home), OMP_NUM_THREADS="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def _field(stdout: str, label: str) -> str:
    match = re.search(rf"^{label}\s+(.+)$", stdout, re.MULTILINE)
    assert match, f"no {label!r} line in:\n{stdout}"
    return match.group(1).strip()


def _client(home) -> MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    return MlflowClient(uri, registry_uri=uri)


def _children(client, parent_id: str) -> dict:
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    return {r.info.run_name: r for r in runs}


def test_two_runs_at_once_in_one_folder_report_their_own_results(tiny_assets, tmp_path):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    procs = {
        name: subprocess.Popen(
            _args(tiny_assets, f"name={name}", f"train.learning_rate={lr}"),
            cwd=work,
            env=_env(home),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, lr in (("run-a", "3e-2"), ("run-b", "1e-2"))
    }
    outs = {name: p.communicate(timeout=900) for name, p in procs.items()}
    for name, (stdout, stderr) in outs.items():
        assert procs[name].returncode == 0, f"{name}:\n{stdout[-3000:]}\n{stderr[-3000:]}"

    client = _client(home)
    seen = {}
    for name, (stdout, _) in outs.items():
        run_id = _field(stdout, "MLflow run")
        assert client.get_run(run_id).info.run_name == name  # the summary names this run's own parent run
        version = re.search(r"\(version (\d+)\)", _field(stdout, "Model")).group(1)
        registered = client.get_run(run_id).data.tags["sdtune.model_version"]
        assert version == registered
        seen[name] = (run_id, version, _field(stdout, "Pipeline run").split()[0], _field(stdout, "Task logs"))
    a, b = seen["run-a"], seen["run-b"]
    for i, what in enumerate(("MLflow run", "model version", "pipeline folder", "log file")):
        assert a[i] != b[i], f"both runs report the same {what}: {a[i]}"
    assert sorted([a[1], b[1]]) == ["1", "2"]
    # Artifacts stay in the sdtune home, not in whichever folder the command ran from.
    assert (home / "mlartifacts").is_dir()
    assert not (work / "mlruns").exists()
    look = _field(outs["run-a"][0], "Look")
    assert look == f"mlflow ui --backend-store-uri sqlite:///{home / 'mlflow.db'}"


def test_ctrl_c_closes_the_runs_as_killed_and_a_rerun_reuses_finished_steps(tiny_assets, tmp_path):
    home = tmp_path / "home"
    args = _args(tiny_assets, "name=interrupted")
    proc = subprocess.Popen(
        [*args, "train.max_steps=100000"],  # still training when the interrupt comes
        cwd=tmp_path,
        env=_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group, as a terminal gives the foreground command
        # A terminal's foreground command has Ctrl-C's default action even when the tests were started in the
        # background (a shell without job control starts background jobs with SIGINT ignored, and children
        # inherit that: the interrupt would then never arrive).
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if re.search(r"✓ caption", line):
            time.sleep(6)  # into the train task
            os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: the whole process group gets it
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    error = next(line for line in output.splitlines() if line.startswith("error: interrupted"))
    assert "finished: ingest, preprocess, merge, caption" in error
    assert "stopped: train" in error

    client = _client(home)
    parent_id = re.search(r"MLflow run (\w+) marked KILLED", error).group(1)
    assert client.get_run(parent_id).info.status == "KILLED"
    steps = _children(client, parent_id)
    assert steps["train"].info.status == "KILLED"
    assert {s: steps[s].info.status for s in ("ingest", "preprocess", "caption")} == dict.fromkeys(
        ("ingest", "preprocess", "caption"), "FINISHED"
    )

    rerun = subprocess.run(args, cwd=tmp_path, env=_env(home), capture_output=True, text=True, timeout=900)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    for step in ("ingest", "preprocess", "caption"):
        assert re.search(rf"✓ {step}\s.*\(cached\)", rerun.stdout), rerun.stdout
    assert not re.search(r"✓ train\s.*\(cached\)", rerun.stdout)
