"""The sweep pipeline: the data stages once, then the trials fanned out, then the best one registered.

    start-sweep → data (ingest, preprocess, caption) ─┬─ trial-000 (train + evaluate) ─┬→ select-best → register-best
                                                      ├─ trial-001 …                   │  (exit handler: finish-run)
                                                      └─ … (ParallelFor, parallelism = sweep.parallelism)

The trials are computed when the pipeline is built (``sdtune.sweep.space.build_trials``) and compiled in as
the ParallelFor items, one line of JSON each (index + overrides); each trial applies its overrides to the
pipeline's ``config`` parameter. Composition only: no torch-side imports here.
"""

import json
from pathlib import Path

from kfp import compiler, dsl

from components import finish_run_op
from components.sweep import register_best_op, select_best_op, start_sweep_op, sweep_data_op, sweep_trial_op
from pipelines.cluster import apply_task_settings
from sdtune.config import RunConfig
from sdtune.sweep.space import Trial

PIPELINE_NAME = "sdtune-sweep"


def build_sweep_pipeline(cfg: RunConfig, trials: list[Trial], sweep_id: str = ""):
    """The pipeline for one sweep: ``cfg`` (with its ``sweep`` section) is the default config parameter."""
    items = [t.to_json() for t in trials]
    # A trial trains in its own pod: the train step's resources, retries and timeout, never a job launcher.
    trial_cfg = cfg.model_copy(deep=True)
    trial_cfg.cluster.launcher = "single_node"

    def step(task, name: str, display: str, settings: RunConfig = cfg):
        task.set_display_name(display)
        task.set_caching_options(False)  # sdtune's content-addressed cache decides (see personalize.py)
        return apply_task_settings(task, name, settings)

    @dsl.pipeline(name=PIPELINE_NAME, description="Sweep hyperparameters/prompts; register the best trial.")
    def sweep_pipeline(config: str = cfg.storable(refuse=True).to_param(), sweep_id: str = sweep_id):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = step(finish_run_op(config=config, kfp_run_id=run_id), "finish_run", "Close MLflow sweep run")
        with dsl.ExitHandler(finish, name="tracked-sweep"):
            parent = step(
                start_sweep_op(config=config, kfp_run_id=run_id, sweep_id=sweep_id, trials=json.dumps(items)),
                "start_run",
                "Open MLflow sweep run",
            )
            sweep_run = parent.output
            data = step(sweep_data_op(config=config, parent_run_id=sweep_run), "preprocess", "Prepare data")
            with dsl.ParallelFor(items=items, parallelism=cfg.sweep.parallelism, name="trials") as item:
                trial = step(
                    sweep_trial_op(
                        config=config,
                        sweep_id=sweep_id,
                        kfp_run_id=run_id,
                        trial=item,
                        ingested=data.outputs["ingested"],
                        images=data.outputs["images"],
                        dataset=data.outputs["dataset"],
                    ),
                    "train",
                    "Trial",
                    trial_cfg,
                )
            best = step(
                select_best_op(
                    config=config,
                    sweep_run_id=sweep_run,
                    sweep_id=sweep_id,
                    results=dsl.Collected(trial.outputs["Output"]),
                ),
                "select_best",
                "Select best trial",
            )
            step(
                register_best_op(config=config, sweep_run_id=sweep_run, best=best.outputs["Output"]),
                "register",
                "Register best",
            )

    return sweep_pipeline


def compile_sweep(cfg: RunConfig, trials: list[Trial], out_path: Path, sweep_id: str = "") -> Path:
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_sweep_pipeline(cfg, trials, sweep_id), package_path=str(out_path))
    return out_path
