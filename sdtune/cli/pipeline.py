"""Pipeline commands: run the whole pipeline locally through kfp.local, compile it to YAML.

kfp and ``pipelines`` are imported inside the commands: the core never needs them.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from sdtune.config import RunConfig, load_config, resolve_local_paths
from sdtune.errors import SdtuneError

console = Console()


class PipelineError(SdtuneError):
    exit_code = 4


class _TaskProgress(io.TextIOBase):
    """Stands in for stdout while kfp.local runs: everything goes to the log file; the console gets one line
    per task (started, finished with its time), instead of every task's executor input and output JSON."""

    def __init__(self, log, echo):
        self._log, self._echo, self._pending = log, echo, ""
        self._started: dict[str, float] = {}

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
            self._started[match.group(1)] = time.monotonic()
        elif match := re.search(r"Task '([^']+)' finished with status (\w+)", line):
            task, state = match.groups()
            took = time.monotonic() - self._started.get(task, time.monotonic())
            mark = "[green]✓[/]" if state == "SUCCESS" else "[red]✗[/]"
            self._echo(f"  {mark} {task.removesuffix('-op'):<28} {took:6.1f} s")


def run_local(cfg: RunConfig, pipeline_root: Path | None = None, verbose: bool = False) -> dict:
    """Run the personalisation pipeline with ``kfp.local`` (each task a subprocess of this interpreter).

    Unless ``verbose``, the tasks' own output goes to ``$SDTUNE_HOME/logs/run-<time>.log`` and the console
    shows one line per task."""
    from sdtune import tracking

    base = Path(cfg.model.base)
    if base.is_absolute() and not base.exists():
        raise SdtuneError(
            f"base model folder not found: {base} (make one with `sdtune models tiny --out {base}`)"
        )
    for source in cfg.ingest.sources:
        if Path(source).is_absolute() and not Path(source).exists():
            raise SdtuneError(
                f"data source not found: {source} (make sample data with `sdtune sample-data --out {source}`)"
            )
    if not cfg.ingest.sources:
        raise SdtuneError("no data: set ingest.sources in the config or pass ingest.sources=[DIR]")

    # Tasks run in subprocesses: pin the tracking home to an absolute path so they all agree.
    os.environ["SDTUNE_HOME"] = str(tracking.sdtune_home())
    pipeline_root = Path(pipeline_root or tracking.sdtune_home() / "pipeline-root").resolve()

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
    started_ms = int(time.time() * 1000)
    pipeline = build_personalize_pipeline(cfg)
    log_path = tracking.sdtune_home() / "logs" / f"run-{time.strftime('%Y%m%d-%H%M%S')}.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    where = "task logs above" if verbose else f"task logs in {log_path}"
    try:
        with open(log_path, "w", encoding="utf-8") as log:
            if not verbose:
                console.print(
                    f"running {PIPELINE_NAME} locally (task logs: {_short(str(log_path))})", soft_wrap=True
                )
            # The echo console holds the real stdout: rich would otherwise follow the redirect into the log.
            echo = Console(file=sys.stdout, highlight=False).print
            quiet = (
                contextlib.redirect_stdout(_TaskProgress(log, echo))
                if not verbose
                else contextlib.nullcontext()
            )
            with quiet:
                pipeline(config=cfg.to_param())
    except RuntimeError as exc:
        parent = tracking.latest_parent_run(cfg.tracking.experiment, started_ms)
        reason = tracking.failed_step_error(parent) if parent else None
        if not reason:
            reason = _strip_ansi(str(exc).splitlines()[0]) if str(exc) else "pipeline failed"
        raise PipelineError(f"{reason} ({where}; artifacts under {pipeline_root})") from None
    elapsed = time.monotonic() - started
    run_dirs = sorted(set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before)
    if not run_dirs:
        raise PipelineError(f"pipeline finished but left no run folder under {pipeline_root}")
    run_dir = run_dirs[-1]
    summary = _task_output(run_dir, "register-op")
    summary.update(
        run_dir=str(run_dir), seconds=round(elapsed, 1), ui=tracking.ui_command(), log=str(log_path)
    )
    return summary


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


def print_summary(summary: dict) -> None:
    gate = summary.get("gate") or {}
    rows = [
        ("MLflow run", summary.get("parent_run_id")),
        ("Model", f"{summary.get('uri')} (version {summary.get('version')})"),
        ("Champion", f"{'promoted' if gate.get('promote') else 'kept'}: {gate.get('reason', '-')}"),
        ("Model files", _short(summary.get("model_dir"))),
        ("Sample grid", _short(summary.get("grid"))),
        ("Pipeline run", f"{_short(summary.get('run_dir'))} ({summary.get('seconds')} s)"),
        ("Task logs", _short(summary.get("log"))),
    ]
    rows += [(f"  {k}", f"{v:.5g}") for k, v in sorted(summary.get("metrics", {}).items())]
    console.rule("[bold green]sdtune run finished")
    for label, value in rows:
        console.print(f"[bold]{label:<14}[/] {value}", highlight=False, soft_wrap=True)
    console.print(f"[bold]{'Look':<14}[/] {summary.get('ui')}", highlight=False, soft_wrap=True)


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
        """Run the whole pipeline: ingest → preprocess → caption → train → evaluate → register."""
        if not local_run:
            raise SdtuneError("only --local runs here; use `sdtune submit CONFIG --host URL` for a cluster")
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
        """Compile the pipeline to KFP IR YAML (upload it in the KFP UI or with `sdtune submit`)."""
        from pipelines.compile import compile_pipeline

        path = compile_pipeline(load_config(config, overrides or []), out)
        console.print(f"wrote {path}")
