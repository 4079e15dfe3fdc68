"""`sdtune sweep CONFIG …` (fan out trials, keep the best) and `sdtune sweeps list|show|trial`.

kfp, ``pipelines`` and the kubernetes client are imported inside the commands only.
"""

from __future__ import annotations

import json
import os
import secrets
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table
from rich.text import Text

from sdtune.cli.printing import labelled, plain_console
from sdtune.config import RunConfig, config_from_dict, load_config, resolve_local_paths
from sdtune.errors import ConfigError, UsageError
from sdtune.sweep.select import SweepFailed, TrialResult, rank_trials
from sdtune.sweep.space import Trial, build_trials, parse_grid_option, parse_trial_option, read_prompts

console = plain_console()


def new_sweep_id() -> str:
    """A lowercase DNS label (also a Katib Experiment name): ``sweep-YYYYMMDD-HHMMSS-xxxx``."""
    return f"sweep-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


def sweep_config(
    cfg: RunConfig,
    *,
    grid: list[str] | None = None,
    random_trials: int | None = None,
    prompts: Path | None = None,
    prompt_key: str | None = None,
    **settings: Any,
) -> RunConfig:
    """``cfg`` with the command-line search space and settings merged into its ``sweep`` section."""
    data = cfg.model_dump(mode="json")
    sw = data["sweep"]
    lists, ranges = parse_grid_option(grid or [])
    sw["grid"].update(lists)
    sw["ranges"].update(ranges)
    if prompts is not None:
        sw["prompts"] = read_prompts(prompts)
    if prompt_key:
        sw["prompt_key"] = prompt_key
    if random_trials is not None:
        sw["max_trials"] = random_trials
        if sw["algorithm"] == "grid" and settings.get("algorithm") in (None, "grid"):
            settings["algorithm"] = "random"
    sw.update({k: v for k, v in settings.items() if v is not None})
    return config_from_dict(data, origin="sweep options")


def run_sweep_local(
    cfg: RunConfig,
    trials: list[Trial],
    sweep_id: str,
    pipeline_root: Path | None = None,
    verbose: bool = False,
) -> dict:
    """Run the sweep pipeline through ``kfp.local``; returns the register step's summary plus the trials."""
    from sdtune import tracking
    from sdtune.cli.pipeline import (
        PipelineError,
        _prepare_tracking,
        _short,
        _strip_ansi,
        _task_output,
        new_log_path,
        task_lines,
    )
    from sdtune.sweep import tracking as sweep_tracking

    if not cfg.ingest.sources:
        raise ConfigError("no data: set ingest.sources in the config or pass ingest.sources=[DIR]")
    for path in (cfg.model.base, *cfg.ingest.sources):
        if Path(path).is_absolute() and not Path(path).exists():
            raise ConfigError(f"not found: {path}")
    os.environ["SDTUNE_HOME"] = str(tracking.sdtune_home())  # tasks are subprocesses: agree on the store
    ui = _prepare_tracking(cfg.tracking.experiment)
    log_path = new_log_path("sweep", sweep_id)
    pipeline_root = Path(pipeline_root or tracking.sdtune_home() / "pipeline-root").resolve()

    from kfp import local

    from pipelines.sweep import PIPELINE_NAME, build_sweep_pipeline

    local.init(
        runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(pipeline_root), raise_on_error=True
    )
    before = set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) if pipeline_root.exists() else set()
    started = time.monotonic()
    local_cfg = cfg.model_copy(deep=True)
    local_cfg.cluster.train_retries = 0  # kfp.local honours retries (with their minutes of backoff)
    pipeline = build_sweep_pipeline(local_cfg, trials, sweep_id)
    try:
        with task_lines(log_path, PIPELINE_NAME, verbose):
            pipeline(config=cfg.to_param(), sweep_id=sweep_id)
    except RuntimeError as exc:
        reason = None
        run_id = sweep_tracking.find_sweep_run(cfg.tracking.experiment, sweep_id)
        if run_id:
            tags = tracking.mlflow_client().get_run(run_id).data.tags
            reason = tags.get("sdtune.sweep.error") or tracking.failed_step_error(run_id)
        reason = reason or (_strip_ansi(str(exc).splitlines()[0]) if str(exc) else "sweep failed")
        raise PipelineError(
            f"{reason} (sweep {sweep_id}; task logs in {_short(str(log_path))}; artifacts under {pipeline_root})"
        ) from None
    run_dirs = sorted(set(pipeline_root.glob(f"{PIPELINE_NAME}-*")) - before)
    if not run_dirs:
        raise PipelineError(f"sweep finished but left no run folder under {pipeline_root}")
    summary = _task_output(run_dirs[-1], "register-best-op")
    summary.update(
        run_dir=str(run_dirs[-1]),
        comparison=str(run_dirs[-1] / "select-best-op" / "comparison"),
        seconds=round(time.monotonic() - started, 1),
        sweep_id=sweep_id,
        ui=ui,
        log=str(log_path),
    )
    return summary


def print_trials(
    results: list[TrialResult], metric: str, direction: str, best: str | None = None, title: str = ""
) -> None:
    ranked = rank_trials(results, metric, direction)
    keys: list[str] = []
    for r in results:
        keys += [k for k in r.overrides if k not in keys]
    table = Table(title=title or f"trials by {metric} ({direction})")
    for col in ("", "#", "trial", "status", *keys, metric, "run", "error"):
        table.add_column(col, overflow="fold")
    for rank, r in enumerate(ranked, 1):
        table.add_row(
            "★" if r.name == best else "",
            str(rank) if r.ok else "-",
            r.name,
            r.status,
            *(
                json.dumps(r.overrides[k])
                if k in r.overrides and not isinstance(r.overrides[k], str)
                else str(r.overrides.get(k, ""))
                for k in keys
            ),
            f"{r.metrics[metric]:.5g}" if metric in r.metrics else "",
            r.run_id[:8],
            r.error[:80],
        )
    console.print(table)


def _sweep_settings(experiment: str, sweep_id: str) -> tuple[str, dict[str, str], dict[str, str]]:
    from sdtune import tracking
    from sdtune.sweep import tracking as sweep_tracking

    run_id = sweep_tracking.find_sweep_run(experiment, sweep_id)
    if run_id is None:
        raise UsageError(f"no sweep {sweep_id!r} in experiment {experiment!r} (see `sdtune sweeps list`)")
    run = tracking.mlflow_client().get_run(run_id)
    return run_id, dict(run.data.params), dict(run.data.tags)


def show_sweep(sweep: str, experiment: str, metric: str | None = None, html: Path | None = None) -> None:
    """Print a sweep's trials sorted by its metric (★ = best); optionally write the comparison page."""
    from sdtune.sweep import tracking as sweep_tracking
    from sdtune.sweep.page import comparison_html

    _, params, tags = _sweep_settings(experiment, sweep)
    metric = metric or params.get("sweep.metric", "loss_tuned_trigger")
    direction = params.get("sweep.direction", "minimize")
    rows = sweep_tracking.trial_rows(experiment, sweep)
    best = tags.get("sdtune.best_trial")
    print_trials(rows, metric, direction, best, title=f"sweep {sweep}: trials by {metric} ({direction})")
    if html:
        grids = {}
        for r in rows:
            png = sweep_tracking.grid_png_bytes(sweep_tracking.child_run_ids(r.run_id).get("evaluate", ""))
            if png:
                grids[r.name] = png
        best_row = next((r for r in rows if r.name == best), None)
        html.parent.mkdir(parents=True, exist_ok=True)
        html.write_text(comparison_html(sweep, metric, direction, rows, grids, best_row), encoding="utf-8")
        console.print(f"wrote {html}")


def register(app: typer.Typer) -> None:
    @app.command("sweep")
    def sweep_command(
        config: Annotated[
            Path, typer.Argument(help="Run config (YAML preset); its `sweep` section is the default")
        ],
        overrides: Annotated[list[str] | None, typer.Argument(help="key=value config overrides")] = None,
        grid: Annotated[
            list[str] | None,
            typer.Option(
                "--grid", help="KEY=v1,v2 (every combination) or KEY=loguniform:1e-5:1e-3 (with --random)"
            ),
        ] = None,
        random_trials: Annotated[int | None, typer.Option("--random", help="Random search: N trials")] = None,
        prompts: Annotated[
            Path | None, typer.Option("--prompts", help="File of prompt/caption template variants")
        ] = None,
        prompt_key: Annotated[str | None, typer.Option(help="Config key the prompt variants set")] = None,
        trial: Annotated[list[str] | None, typer.Option("--trial", help="An extra trial: 'k=v k=v'")] = None,
        metric: Annotated[str | None, typer.Option(help="Evaluation metric to optimise")] = None,
        direction: Annotated[str | None, typer.Option(help="minimize or maximize")] = None,
        parallelism: Annotated[int | None, typer.Option(help="Trials at once")] = None,
        max_failed: Annotated[int | None, typer.Option(help="Failed trials tolerated")] = None,
        algorithm: Annotated[
            str | None, typer.Option(help="grid, random, bayesianoptimization, tpe (katib)")
        ] = None,
        seed: Annotated[int | None, typer.Option(help="Random-search seed")] = None,
        engine: Annotated[
            str | None, typer.Option(help="kfp (default; local or a KFP cluster) or katib")
        ] = None,
        local_run: Annotated[bool, typer.Option("--local", help="Run here through kfp.local")] = False,
        host: Annotated[
            str | None, typer.Option("--host", envvar="KF_PIPELINES_ENDPOINT", help="KFP API URL")
        ] = None,
        namespace: Annotated[str | None, typer.Option(help="Kubernetes/Kubeflow namespace")] = None,
        image: Annotated[
            str | None, typer.Option(help="katib: trial image (default: the sdtune train image)")
        ] = None,
        out: Annotated[
            Path | None,
            typer.Option(help="Write the pipeline YAML (kfp) or Experiment YAML (katib) and stop"),
        ] = None,
        follow: Annotated[
            bool, typer.Option(help="katib: wait for the experiment and print the best trial")
        ] = True,
        register_best: Annotated[
            bool,
            typer.Option("--register/--no-register", help="katib: register the best trial (needs MLflow)"),
        ] = True,
        sweep_id: Annotated[str | None, typer.Option(help="Sweep id (default: generated)")] = None,
        pipeline_root: Annotated[Path | None, typer.Option(help="Where local task artifacts go")] = None,
        verbose: Annotated[
            bool, typer.Option("--verbose", "-v", help="--local: show every task's full output")
        ] = False,
    ) -> None:
        """Fan out trials over a grid, random ranges or prompt variants; compare them; register the best.

        Example: sdtune sweep configs/debug/tiny_cpu.yaml --grid train.rank=4,8 --local"""
        cfg = load_config(config, overrides or [])
        cfg = sweep_config(
            cfg,
            grid=grid,
            random_trials=random_trials,
            prompts=prompts,
            prompt_key=prompt_key,
            metric=metric,
            direction=direction,
            parallelism=parallelism,
            max_failed=max_failed,
            algorithm=algorithm,
            seed=seed,
            engine=engine,
        )
        extra = [parse_trial_option(t) for t in trial or []]
        sweep_id = sweep_id or new_sweep_id()
        if cfg.sweep.engine == "katib":
            if extra:
                raise ConfigError("--trial needs the kfp engine (Katib's algorithms choose the trials)")
            _katib(cfg, sweep_id, namespace, image, out, follow, register_best)
            return
        if cfg.sweep.algorithm in ("bayesianoptimization", "tpe"):
            raise ConfigError(f"{cfg.sweep.algorithm} adapts to finished trials: use --engine katib")
        trials = build_trials(cfg, extra)
        console.print(
            f"sweep {sweep_id}: {len(trials)} trials, parallelism {cfg.sweep.parallelism}, "
            f"metric {cfg.sweep.metric} ({cfg.sweep.direction})",
            highlight=False,
        )
        if out:
            from pipelines.sweep import compile_sweep

            console.print(f"wrote {compile_sweep(cfg, trials, out, sweep_id)}")
            return
        if host and not local_run:
            _submit_kfp(cfg, trials, sweep_id, host, namespace)
            return
        if not local_run:
            raise UsageError(
                "pass --local (run here), --host URL (a KFP cluster) or --out FILE (compile only)"
            )
        cfg = resolve_local_paths(cfg, Path.cwd())
        summary = run_sweep_local(cfg, trials, sweep_id, pipeline_root, verbose=verbose)
        _print_local_summary(cfg, summary)

    sweeps = typer.Typer(help="Look at sweeps; `trial` is what a Katib trial pod runs.", no_args_is_help=True)
    app.add_typer(sweeps, name="sweeps")

    @sweeps.command("list")
    def list_command(
        experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "sdtune",
        limit: Annotated[int, typer.Option(help="Newest N sweeps")] = 20,
    ) -> None:
        """The sweeps of an experiment, newest first.

        Example: sdtune sweeps list --experiment sdtune
        """
        from sdtune import tracking

        client = tracking.mlflow_client()
        found = client.get_experiment_by_name(experiment)
        runs = (
            []
            if found is None
            else client.search_runs(
                [found.experiment_id],
                "tags.`sdtune.pipeline` = 'sweep' and tags.`sdtune.role` = 'parent'",
                max_results=limit,
                order_by=["attributes.start_time DESC"],
            )
        )
        if not runs:
            console.print(f"no sweeps in experiment {experiment!r}")
            return
        table = Table(title=f"sweeps in {experiment}")
        for col in ("sweep", "status", "trials", "failed", "metric", "best", "best trial"):
            table.add_column(col)
        for run in runs:
            tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
            metric = params.get("sweep.metric", "")
            table.add_row(
                tags.get("sdtune.sweep_id", ""),
                run.info.status,
                tags.get("sdtune.sweep.trials", ""),
                f"{metrics['sweep_failed']:.0f}" if "sweep_failed" in metrics else "",
                metric,
                f"{metrics[metric]:.5g}" if metric in metrics else "",
                tags.get("sdtune.best_trial", ""),
            )
        console.print(table)

    @sweeps.command("show")
    def show_command(
        sweep: Annotated[
            str, typer.Argument(help="Sweep id (printed by `sdtune sweep`, or `sdtune sweeps list`)")
        ],
        experiment: Annotated[str, typer.Option(help="MLflow experiment")] = "sdtune",
        metric: Annotated[str | None, typer.Option(help="Sort by this metric (default: the sweep's)")] = None,
        html: Annotated[Path | None, typer.Option(help="Also write the comparison page here")] = None,
    ) -> None:
        """The trials of a sweep sorted by the metric; ★ marks the best.

        Example: sdtune sweeps show sweep-20261203-101500-ab12
        """
        show_sweep(sweep, experiment, metric, html)

    @sweeps.command("trial")
    def trial_command(
        sweep_id: Annotated[str, typer.Option("--sweep-id", help="The sweep (Katib Experiment) id")],
        overrides: Annotated[list[str] | None, typer.Argument(help="key=value trial values (YAML)")] = None,
        text: Annotated[
            list[str] | None, typer.Option("--text", help="key=value taken verbatim (prompts)")
        ] = None,
        trial_name: Annotated[
            str, typer.Option(help="The trial's name (Katib: ${trialSpec.Name})")
        ] = "trial",
        workdir: Annotated[Path, typer.Option(help="Scratch folder for the trial's stages")] = Path(
            "sdtune-trial"
        ),
        config: Annotated[
            Path | None, typer.Option(help="Config YAML (default: $SDTUNE_CONFIG, one line of JSON)")
        ] = None,
    ) -> None:
        """Run one trial end to end and print `metric=value` lines (Katib's StdOut collector reads them).

        Example: sdtune sweeps trial --sweep-id sweep-20261203-101500-ab12 --config configs/debug/tiny_cpu.yaml train.rank=8
        """
        from sdtune.config import config_from_yaml
        from sdtune.sweep.space import parse_value
        from sdtune.sweep.trial import print_metrics, run_standalone_trial

        if config is not None:
            base = load_config(config)
        elif os.environ.get("SDTUNE_CONFIG"):
            base = config_from_yaml(os.environ["SDTUNE_CONFIG"])
        else:
            raise ConfigError("no config: pass --config FILE or set SDTUNE_CONFIG")
        values: dict[str, Any] = {}
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"trial value {item!r} is not key=value")
            values[key] = parse_value(raw)
        for item in text or []:
            key, sep, raw = item.partition("=")
            if not sep:
                raise ConfigError(f"--text {item!r} is not key=value")
            values[key] = raw
        result = run_standalone_trial(base, sweep_id, Trial(0, values), workdir, trial_label=trial_name)
        if not result.ok:
            raise SweepFailed(f"{result.name} failed: {result.error}")
        print_metrics(result.metrics)


def _print_local_summary(cfg: RunConfig, summary: dict) -> None:
    from sdtune.sweep import tracking as sweep_tracking

    rows = sweep_tracking.trial_rows(cfg.tracking.experiment, summary["sweep_id"])
    print_trials(rows, cfg.sweep.metric, cfg.sweep.direction, summary.get("best_trial"))
    best = next((r for r in rows if r.name == summary.get("best_trial")), None)
    console.rule(Text("sdtune sweep finished", style="bold green"))
    lines = [
        (
            "Sweep",
            f"{summary['sweep_id']} ({len(rows)} trials, {sum(not r.ok for r in rows)} failed, {summary['seconds']} s)",
        ),
        (
            "Best trial",
            f"{summary.get('best_trial')}: {Trial(best.index, best.overrides).describe() if best else ''}",
        ),
        (cfg.sweep.metric, f"{best.metrics.get(cfg.sweep.metric, float('nan')):.5g}" if best else "-"),
        ("Model", f"{summary.get('uri')} (version {summary.get('version')})"),
        ("Champion", champion_line(summary)),
        ("Comparison", summary.get("comparison", "-")),
        ("Task logs", summary.get("log", "-")),
        ("MLflow run", summary.get("parent_run_id", "-")),
        ("Look", f"sdtune sweeps show {summary['sweep_id']} · {summary.get('ui')}"),
    ]
    for label, value in lines:
        console.print(labelled(label, value, 18), highlight=False, soft_wrap=True)


def champion_line(summary: dict) -> str:
    from sdtune.cli.pipeline import champion_line as line

    return line(summary)


def _submit_kfp(cfg: RunConfig, trials: list[Trial], sweep_id: str, host: str, namespace: str | None) -> None:
    from pipelines.sweep import compile_sweep
    from sdtune.cli.cluster import api_errors, kfp_client, run_url

    client = kfp_client(host, namespace, None, None, None)
    with tempfile.TemporaryDirectory() as tmp, api_errors(host):
        package = compile_sweep(cfg, trials, Path(tmp) / "sweep.yaml", sweep_id)
        result = client.create_run_from_pipeline_package(
            str(package),
            arguments={},
            run_name=f"{cfg.name}-{sweep_id}",
            experiment_name=cfg.tracking.experiment,
            namespace=namespace,
            service_account=cfg.cluster.service_account,
        )
    console.print(
        f"sweep {sweep_id}: run {result.run_id}: {run_url(client, result.run_id)}",
        highlight=False,
        soft_wrap=True,
    )


def _katib(
    cfg: RunConfig,
    sweep_id: str,
    namespace: str | None,
    image: str | None,
    out: Path | None,
    follow: bool,
    register_best: bool,
    custom_api: Any = None,
) -> None:
    import yaml

    from components._images import SDTUNE_TRAIN_IMAGE
    from sdtune.sweep import katib

    namespace = namespace or cfg.cluster.namespace
    if not namespace:
        from sdtune.cluster.launch import current_namespace

        namespace = current_namespace()
    experiment = katib.render_experiment(cfg, sweep_id, image or SDTUNE_TRAIN_IMAGE, namespace)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(yaml.safe_dump(experiment, sort_keys=False), encoding="utf-8")
        console.print(f"wrote {out} (apply with `kubectl apply -f {out}`)")
        return
    remote_tracking = bool(os.environ.get("MLFLOW_TRACKING_URI"))
    if remote_tracking:  # trials find the sweep's parent run by its id; without it the first trial opens it
        from sdtune.sweep import tracking as sweep_tracking

        sweep_tracking.start_sweep_run(cfg, sweep_id, [], engine="katib")
    katib.submit_experiment(experiment, custom_api)
    console.print(
        f"Katib experiment {namespace}/{sweep_id} submitted ({experiment['spec']['maxTrialCount']} trials, "
        f"{cfg.sweep.parallelism} at once)",
        highlight=False,
    )
    if not follow:
        return
    final = katib.follow_experiment(sweep_id, namespace, custom_api=custom_api)
    best = katib.optimal_trial(final)
    console.print(f"best trial {best['trial']}: {best['parameters']} → {best['metrics']}", highlight=False)
    if register_best and remote_tracking:
        _register_from_mlflow(cfg, sweep_id)


def _register_from_mlflow(cfg: RunConfig, sweep_id: str) -> None:
    from sdtune.sweep import tracking as sweep_tracking
    from sdtune.sweep.select import select_best
    from sdtune.sweep.steps import register_best_step

    sw = cfg.sweep
    rows = sweep_tracking.trial_rows(cfg.tracking.experiment, sweep_id)
    run_id = sweep_tracking.find_sweep_run(cfg.tracking.experiment, sweep_id)
    best = select_best(rows, sw.metric, sw.direction, max_failed=len(rows))
    sweep_tracking.mark_best(run_id, best, rows, sw.metric)
    summary = register_best_step(cfg.to_param(), run_id, best.to_json())
    print_trials(rows, sw.metric, sw.direction, best.name)
    console.print(
        f"registered {summary['uri']} (version {summary['version']}); champion: {summary['gate']['reason']}",
        highlight=False,
    )
