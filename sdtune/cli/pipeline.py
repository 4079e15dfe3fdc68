"""Pipeline commands: run the whole pipeline locally through kfp.local, compile it to YAML.

kfp and ``pipelines`` are imported inside the commands: the core never needs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import secrets
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from sdtune.cli.printing import labelled, plain_console
from sdtune.config import RunConfig, load_config, resolve_local_paths
from sdtune.errors import ConfigError, Interrupted, SdtuneError, UsageError
from sdtune.steps import CACHE_HIT_LINE

console = plain_console()


class PipelineError(SdtuneError):
    exit_code = 4


class _TaskProgress(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: everything goes to the log file; the console gets one line
    per task (started, finished with its time), instead of every task's executor input and output JSON."""

    def __init__(self, log, echo):
        self._log, self._echo, self._pending = log, echo, ""
        self._started: dict[str, float] = {}
        self._cached: set[str] = set()
        self._current = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        self._log.write(text)
        self._pending += text
        *lines, self._pending = self._pending.split("\n")
        for line in lines:
            self._watch(_strip_ansi(line))
        return len(text)

    def flush(self) -> None:
        self._log.flush()

    def _watch(self, line: str) -> None:
        import re

        if match := re.search(r"Executing task '([^']+)'", line):
            self._current = match.group(1)
            self._started[self._current] = time.monotonic()
        elif line.lstrip().startswith(CACHE_HIT_LINE):  # tasks run one at a time here: the current one
            self._cached.add(self._current)
        elif match := re.search(r"Task '([^']+)' finished with status (\w+)", line):
            task, state = match.groups()
            took = time.monotonic() - self._started.get(task, time.monotonic())
            mark = ("✓", "green") if state == "SUCCESS" else ("✗", "red")
            cached = "  (cached)" if task in self._cached else ""
            self._echo(Text.assemble("  ", mark, f" {task.removesuffix('-op'):<28} {took:6.1f} s{cached}"))


def run_local(cfg: RunConfig, pipeline_root: Path | None = None, verbose: bool = False) -> dict:
    """Run the personalisation pipeline with ``kfp.local`` (each task a subprocess of this interpreter).

    Unless ``verbose``, the tasks' own output goes to ``$SDTUNE_HOME/logs/run-<time>-<id>.log`` and the
    console shows one line per task. The run finds its own results through an id of its own (a tag on its
    parent MLflow run), so several runs may share a folder and an MLflow store."""
    from sdtune import tracking
    from sdtune.steps import LOCAL_RUN_ENV, LOCAL_RUN_TAG

    _check_local_inputs(cfg)
    # Tasks run in subprocesses: pin the tracking home to an absolute path so they all agree.
    os.environ["SDTUNE_HOME"] = str(tracking.sdtune_home())
    ui = _prepare_tracking(cfg.tracking.experiment)
    pipeline_root = Path(pipeline_root or tracking.sdtune_home() / "pipeline-root").resolve()
    local_run = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    os.environ[LOCAL_RUN_ENV] = local_run

    from kfp import local

    from pipelines.personalize import PIPELINE_NAME, build_personalize_pipeline

    # Expected locally, said once in docs: cluster settings are ignored and tasks run in this interpreter
    # rather than in their images.
    warnings.filterwarnings("ignore", message=".*have no effect in the current local runner.*")
    warnings.filterwarnings("ignore", message=".*non-Python base image.*")
    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) if pipeline_root.exists() else set()
    started = time.monotonic()
    pipeline = build_personalize_pipeline(cfg)
    log_path = new_log_path("run", local_run)
    where = "task logs above" if verbose else f"task logs in {_short(str(log_path))}"
    experiment = cfg.tracking.experiment
    try:
        with task_lines(log_path, PIPELINE_NAME, verbose):
            pipeline(config=cfg.to_param())
    except KeyboardInterrupt:
        raise _interrupted(experiment, local_run, where) from None
    except RuntimeError as exc:
        parent = tracking.find_parent_run_by_tag(experiment, LOCAL_RUN_TAG, local_run)
        reason = tracking.failed_step_error(parent) if parent else None
        if not reason:
            reason = _strip_ansi(str(exc).splitlines()[0]) if str(exc) else "pipeline failed"
        raise PipelineError(f"{reason} ({where}; artifacts under {_short(str(pipeline_root))})") from None
    elapsed = time.monotonic() - started
    parent = tracking.find_parent_run_by_tag(experiment, LOCAL_RUN_TAG, local_run)
    new_dirs = set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before
    run_dir, summary = _own_run(new_dirs, parent)
    if run_dir is None:
        raise PipelineError(f"pipeline finished but left no run folder of its own under {pipeline_root}")
    summary.update(run_dir=str(run_dir), seconds=round(elapsed, 1), ui=ui, log=str(log_path))
    return summary


@contextlib.contextmanager
def task_lines(log_path: Path, pipeline_name: str, verbose: bool = False):
    """While a local pipeline runs: its tasks' output goes to ``log_path`` and the console shows one line
    per task (unless ``verbose``)."""
    if verbose:
        yield
        return
    with open(log_path, "x", encoding="utf-8") as log:
        console.print(f"running {pipeline_name} locally (task logs: {_short(str(log_path))})", soft_wrap=True)
        # The echo console holds the real stdout: rich would otherwise follow the redirect into the log.
        echo = plain_console(file=sys.stdout, highlight=False).print
        with contextlib.redirect_stdout(_TaskProgress(log, echo)):
            yield


def new_log_path(kind: str, run_id: str) -> Path:
    from sdtune import tracking

    path = tracking.sdtune_home() / "logs" / f"{kind}-{run_id}.log"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def _check_local_inputs(cfg: RunConfig) -> None:
    """Refuse, before any task starts, what would make the first tasks fail."""
    base = Path(cfg.model.base)
    if base.is_absolute() and not base.exists():
        what = "file" if base.suffix == ".safetensors" else "folder"
        raise ConfigError(
            f"base model {what} not found: {base} (make one with `sdtune models tiny --out {base}`)"
        )
    if not cfg.ingest.sources:
        raise ConfigError("no data: set ingest.sources in the config or pass ingest.sources=[DIR]")
    for source in cfg.ingest.sources:
        if Path(source).is_absolute() and not Path(source).exists():
            raise ConfigError(
                f"data source not found: {source} (make sample data with `sdtune sample-data --out {source}`)"
            )


def _prepare_tracking(experiment: str) -> str:
    """Create the tracking store and the experiment once, under a lock, before any task starts: two runs
    starting together would otherwise both create the sqlite schema (and one fail). Returns the command
    that shows what is tracked."""
    import fcntl
    import logging

    from sdtune import tracking

    for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
        logging.getLogger(name).setLevel(logging.WARNING)
    embedded, ui = tracking.uses_embedded_store(), tracking.ui_command()
    home = tracking.sdtune_home()
    home.mkdir(parents=True, exist_ok=True)
    try:
        with open(home / ".tracking.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            client = tracking.mlflow_client()
            if client.get_experiment_by_name(experiment) is None:
                location = (home / "mlartifacts").as_uri() if embedded else None
                client.create_experiment(experiment, artifact_location=location)
    except Exception as exc:  # MLflow raises its own, requests' and sqlalchemy's errors
        first = str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__
        raise PipelineError(f"cannot use the MLflow store {tracking.tracking_uri()}: {first}") from None
    return ui


def _own_run(run_dirs: set[Path], parent_run_id: str | None) -> tuple[Path | None, dict]:
    """This run's folder and register summary: the new run folder whose register task names our parent
    MLflow run (other runs sharing the pipeline root may have added folders meanwhile)."""
    for run_dir in sorted(run_dirs):
        try:
            summary = _task_output(run_dir, "register-op")
        except (OSError, KeyError, ValueError):
            continue
        if parent_run_id is None or summary.get("parent_run_id") == parent_run_id:
            return run_dir, summary
    return None, {}


def _interrupted(experiment: str, local_run: str, where: str) -> Interrupted:
    """Ctrl-C: let the task subprocesses stop, close the MLflow runs as KILLED, say what had finished."""
    from sdtune.steps import close_interrupted_run

    interrupted_ms = int(time.time() * 1000)
    _wait_for_children()
    try:
        parent, steps = close_interrupted_run(experiment, local_run, interrupted_ms)
    except Exception as exc:  # a tracking server down must not hide the interrupt
        return Interrupted(f"interrupted; the MLflow runs were not closed ({exc.__class__.__name__})")
    done = [name for name, status in steps.items() if status == "FINISHED"]
    killed = [name for name, status in steps.items() if status == "KILLED"]
    parts = [f"interrupted: MLflow run {parent} marked KILLED" if parent else "interrupted"]
    parts.append(f"finished: {', '.join(done) or 'nothing'}")
    if killed:
        parts.append(f"stopped: {', '.join(killed)}")
    if done:
        parts.append("the same command reuses the finished steps from the cache")
    return Interrupted(f"{'; '.join(parts)} ({where})")


def _wait_for_children(timeout_s: float = 30.0) -> None:
    """The task subprocesses got the same Ctrl-C from the terminal (or get it now, when only this process
    was signalled); wait until they have recorded how they ended."""
    try:
        import psutil
    except ImportError:
        return
    children = psutil.Process().children(recursive=True)
    _, alive = psutil.wait_procs(children, timeout=3)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.send_signal(signal.SIGINT)
    _, alive = psutil.wait_procs(alive, timeout=timeout_s)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()


def _task_output(run_dir: Path, task: str) -> dict:
    executor_output = json.loads((run_dir / task / "executor_output.json").read_text())
    return json.loads(executor_output["parameterValues"]["Output"])


def _strip_ansi(text: str) -> str:
    import re

    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def _short(path: str | None) -> str:
    if not path:
        return "-"
    try:
        return str(Path(path).resolve().relative_to(Path.cwd()))
    except ValueError:
        return str(path)


def champion_line(summary: dict) -> str:
    gate = summary.get("gate") or {}
    reason = gate.get("reason", "-")
    if gate.get("promote"):
        return f"this version is the new champion ({reason})"
    return f"the earlier champion stays ({reason})"


def print_summary(summary: dict) -> None:
    rows = [
        ("MLflow run", summary.get("parent_run_id")),
        ("Model", f"{summary.get('uri')} (version {summary.get('version')})"),
        ("Champion", champion_line(summary)),
        ("Model files", _short(summary.get("model_dir"))),
        ("Sample grid", _short(summary.get("grid"))),
        ("Pipeline run", f"{_short(summary.get('run_dir'))} ({summary.get('seconds')} s)"),
        ("Task logs", _short(summary.get("log"))),
    ]
    rows += [(f"  {k}", f"{v:.5g}") for k, v in sorted(summary.get("metrics", {}).items())]
    console.rule(Text("sdtune run finished", style="bold green"))
    for label, value in rows:
        console.print(labelled(label, value, 14), highlight=False, soft_wrap=True)
    console.print(labelled("Look", summary.get("ui"), 14), highlight=False, soft_wrap=True)


def check_yaml_out(out: Path) -> None:
    """``compile --out`` names the YAML file to write (KFP takes nothing else): refuse a folder, another
    suffix and a path under a file with one line, before the pipeline is built."""
    if out.is_dir():
        raise UsageError(
            f"--out {out} is a folder; name the YAML file to write, e.g. {out / 'personalize.yaml'}"
        )
    if out.suffix.lower() not in (".yaml", ".yml"):
        raise UsageError(f"--out {out}: the pipeline is written as YAML; name a .yaml file")
    for parent in out.parents:
        if parent.is_dir():
            break
        if os.path.lexists(parent):
            raise UsageError(f"--out {out}: {parent} is a file, not a folder; name a .yaml file in a folder")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_command(
        config: Annotated[
            Path, typer.Argument(help="Run config (YAML preset), e.g. configs/debug/tiny_cpu.yaml")
        ],
        overrides: Annotated[
            list[str] | None, typer.Argument(help="key=value overrides, e.g. train.max_steps=10")
        ] = None,
        local_run: Annotated[
            bool, typer.Option("--local", help="Run here through kfp.local (no cluster)")
        ] = False,
        pipeline_root: Annotated[Path | None, typer.Option(help="Where local task artifacts go")] = None,
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="Show every task's full output")
        ] = False,
    ) -> None:
        """Run the whole pipeline: ingest → preprocess → caption → train → evaluate → register.

        Example: sdtune run --local configs/debug/tiny_cpu.yaml train.max_steps=20
        """
        if not local_run:
            raise UsageError("only --local runs here; use `sdtune submit CONFIG --host URL` for a cluster")
        cfg = resolve_local_paths(load_config(config, overrides or []), Path.cwd())
        print_summary(run_local(cfg, pipeline_root, verbose=verbose))

    @app.command("compile")
    def compile_command(
        config: Annotated[
            Path | None, typer.Option("--config", help="Run config whose values become the defaults")
        ] = None,
        out: Annotated[Path, typer.Option(help="Output YAML file")] = Path("dist/pipelines/personalize.yaml"),
        overrides: Annotated[list[str] | None, typer.Argument(help="key=value overrides")] = None,
    ) -> None:
        """Compile the pipeline to KFP IR YAML (upload it in the KFP UI or with `sdtune submit`).

        Example: sdtune compile --config configs/sd15/lora_1gpu.yaml --out dist/pipelines/personalize.yaml
        """
        from pipelines.compile import compile_pipeline

        check_yaml_out(out)
        path = compile_pipeline(load_config(config, overrides or []), out)
        console.print(f"wrote {path}")
