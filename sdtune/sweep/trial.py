"""One trial: (re-)prepare the data only if the trial changes it, train, evaluate — tracked under its own run.

A trial never raises for a failure of its own (bad value, training diverged, out of memory in training):
it records the reason in its MLflow run and returns ``status=FAILED``, so the sweep decides whether that is
tolerable (``sweep.max_failed``). Infrastructure failures (cannot open the run) and cancellation do raise,
so the orchestrator's retry applies.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path

from sdtune.config import RunConfig, config_from_yaml
from sdtune.sweep import tracking as sweep_tracking
from sdtune.sweep.select import TrialResult
from sdtune.sweep.space import Trial, trial_config


@contextlib.contextmanager
def stderr_tail(lines: int = 40) -> Iterator[deque[str]]:
    """Copy fd 2 (ours and child processes') through a pipe: still printed, and the last lines kept, so a
    training subprocess's error message can become the trial's failure reason."""
    tail: deque[str] = deque(maxlen=lines)
    try:
        saved = os.dup(2)
    except OSError:  # no real fd 2 (embedded interpreters): nothing to capture
        yield tail
        return
    read_fd, write_fd = os.pipe()

    def pump() -> None:
        with os.fdopen(read_fd, "rb") as reader:
            for raw in reader:
                os.write(saved, raw)
                tail.append(raw.decode("utf-8", "replace").rstrip())

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    sys.stderr.flush()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    try:
        yield tail
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)  # closes the pipe's last write end: the pump sees EOF
        thread.join(timeout=5)
        os.close(saved)


def failure_reason(exc: BaseException, tail: deque[str] | list[str]) -> str:
    """The exception, plus the child's own ``error: …`` line or last traceback line when it has one."""
    reason = f"{exc.__class__.__name__}: {exc}".strip()
    detail = ""
    for line in reversed(list(tail)):
        text = line.strip()
        if text.startswith("error:") or (
            text
            and not text.startswith(("File ", "^", "~"))
            and ":" in text
            and text.split(":", 1)[0].replace(".", "").isidentifier()
        ):
            detail = text
            break
    return f"{reason} ({detail})" if detail and detail not in reason else reason


def run_trial(
    config: str,
    sweep_run_id: str,
    trial_json: str,
    preprocessed_dir: str | Path,
    captioned_dir: str | Path,
    model_dir: str | Path,
    evaluation_dir: str | Path,
    ingested_dir: str | Path | None = None,
) -> TrialResult:
    """Run one trial of a KFP sweep on the sweep's prepared data; never raises for the trial's own failure."""
    from sdtune.steps import caption_step, evaluate_step, preprocess_step, train_step

    base = config_from_yaml(config)
    trial = Trial.from_json(trial_json)
    model_dir, evaluation_dir = Path(model_dir), Path(evaluation_dir)
    started = time.monotonic()
    cfg: RunConfig | None = None
    config_error = ""
    try:
        cfg = trial_config(base, trial)
    except Exception as exc:  # a value valid at compile time but not with this run's config parameter
        config_error = f"{exc.__class__.__name__}: {exc}"
    run_id = sweep_tracking.open_trial_run(sweep_run_id, trial, cfg)
    result = TrialResult(
        trial.index, trial.name, trial.overrides, "FAILED", run_id=run_id, error=config_error
    )
    if cfg is not None:
        with stderr_tail() as tail:
            try:
                with tempfile.TemporaryDirectory(prefix=f"sdtune-{trial.name}-") as tmp:
                    images, data = Path(preprocessed_dir), Path(captioned_dir)
                    if cfg.preprocess != base.preprocess:
                        if not ingested_dir:
                            raise ValueError("the trial changes preprocessing but has no ingested data")
                        images = Path(tmp) / "preprocessed"
                        preprocess_step(cfg.to_param(), run_id, ingested_dir, images)
                    if cfg.preprocess != base.preprocess or cfg.caption != base.caption:
                        data = Path(tmp) / "captioned"
                        caption_step(cfg.to_param(), run_id, images, data)
                    summary = train_step(cfg.to_param(), run_id, data, model_dir)
                    metrics = evaluate_step(cfg.to_param(), run_id, data, model_dir, evaluation_dir)
                metric = cfg.sweep.metric
                if metric not in metrics:
                    raise KeyError(
                        f"evaluation has no metric {metric!r} (it has: {', '.join(sorted(metrics))})"
                    )
                result.metrics, result.status = metrics, "FINISHED"
                result.train_run_id = str(summary.get("mlflow_run_id", ""))
            except Exception as exc:
                result.error = failure_reason(exc, tail)
    children = sweep_tracking.child_run_ids(run_id)
    result.train_run_id = children.get("train", result.train_run_id)
    result.evaluate_run_id = children.get("evaluate", "")
    result.seconds = round(time.monotonic() - started, 1)
    sweep_tracking.close_trial_run(run_id, result)
    # Output folders always exist (a cluster uploads them) and say what happened.
    for folder in (model_dir, evaluation_dir):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "trial.json").write_text(result.to_json(), encoding="utf-8")
    return result


def print_metrics(metrics: dict[str, float], out=None) -> None:
    """``name=value`` lines: the format Katib's StdOut metrics collector parses."""
    out = out or sys.stdout
    for key in sorted(metrics):
        out.write(f"{key}={float(metrics[key]):.8g}\n")
    out.flush()


def run_standalone_trial(
    cfg_base: RunConfig, sweep_id: str, trial: Trial, workdir: str | Path, trial_label: str = ""
) -> TrialResult:
    """A whole trial in one process (what a Katib trial pod runs): open or find the sweep's parent run, run the
    data stages (content-cached: with a shared ``SDTUNE_CACHE_DIR`` only the first trial computes them), then
    :func:`run_trial`. Returns the result; the caller prints the metrics and sets the exit code."""
    from sdtune.steps import caption_step, ingest_step, preprocess_step

    workdir = Path(workdir)
    experiment = cfg_base.tracking.experiment
    sweep_run_id = sweep_tracking.find_sweep_run(experiment, sweep_id)
    if sweep_run_id is None:  # the submitter could not reach MLflow: the first trial opens the sweep run
        sweep_tracking.start_sweep_run(cfg_base, sweep_id, [trial], engine="katib")
        sweep_run_id = sweep_tracking.find_sweep_run(experiment, sweep_id)
    config = cfg_base.to_param()
    dirs = {name: workdir / name for name in ("ingested", "preprocessed", "captioned", "model", "evaluation")}
    ingest_step(config, sweep_run_id, dirs["ingested"])
    preprocess_step(config, sweep_run_id, dirs["ingested"], dirs["preprocessed"])
    caption_step(config, sweep_run_id, dirs["preprocessed"], dirs["captioned"])
    if trial_label:
        trial = Trial(trial.index, trial.overrides, label=trial_label)
    result = run_trial(
        config,
        sweep_run_id,
        trial.to_json(),
        dirs["preprocessed"],
        dirs["captioned"],
        dirs["model"],
        dirs["evaluation"],
        ingested_dir=dirs["ingested"],
    )
    if trial_label and result.run_id:
        sweep_tracking.set_tags(result.run_id, {"katib.trial": trial_label})
    return result
