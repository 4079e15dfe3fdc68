"""The personalisation pipeline: a handful of photos in, a fine-tuned, evaluated, registered model out.

    start-run → ingest → preprocess (one task per shard) → merge → caption → train → evaluate → register
    (exit handler: finish-run, which also deletes the run's staging after a success)

The model reaches evaluate and register as a KFP artifact, or, for full fine-tunes and DreamBooth (GBs),
as the S3 URI of the train step's outputs (``components.by_uri``, ``sdtune.cluster.outputs``).

Composition only: no ``sdtune`` core or torch imports here. The whole run configuration travels as one
YAML string parameter, so the same compiled pipeline serves every preset.
"""

from kfp import dsl

from components import (
    by_uri,
    caption_op,
    evaluate_op,
    finish_run_op,
    ingest_op,
    merge_op,
    preprocess_op,
    register_op,
    start_run_op,
    train_op,
)
from components._images import SDTUNE_TRAIN_IMAGE
from pipelines.cluster import apply_task_settings
from sdtune.cluster.outputs import outputs_by_uri
from sdtune.config import RunConfig  # pydantic only: the typed settings, never the torch-side core

PIPELINE_NAME = "sdtune-personalize"


def build_personalize_pipeline(cfg: RunConfig):
    """Build the pipeline for one run config: its YAML is the default parameter, its cluster section sets
    each task's resources, GPUs, secrets and retries (ignored by the local runner)."""

    def step(task, name: str, display: str):
        task.set_display_name(display)
        # Every step logs to MLflow: a cache hit would skip the logging. Content-addressed caching is
        # decided by sdtune itself (cache keys over input digests), not by KFP's default key.
        task.set_caching_options(False)
        return apply_task_settings(task, name, cfg)

    if cfg.cluster.launcher != "single_node" and cfg.cluster.train_image is None:
        cfg = cfg.model_copy(deep=True)
        cfg.cluster.train_image = SDTUNE_TRAIN_IMAGE  # the job's pods run the same image as the train task

    # GB-size outputs (full fine-tunes, DreamBooth) stay in S3 and only their URI travels between tasks.
    by_uri_mode = outputs_by_uri(cfg)
    train_task, evaluate_task, register_task = (
        (by_uri.train_op, by_uri.evaluate_op, by_uri.register_op)
        if by_uri_mode
        else (train_op, evaluate_op, register_op)
    )
    model_input = "model_uri" if by_uri_mode else "model"

    @dsl.pipeline(name=PIPELINE_NAME, description="Fine-tune Stable Diffusion on a handful of photos.")
    def personalize_pipeline(config: str = cfg.storable(refuse=True).to_param()):
        run_id = dsl.PIPELINE_JOB_ID_PLACEHOLDER
        finish = step(finish_run_op(config=config, kfp_run_id=run_id), "finish_run", "Close MLflow run")
        with dsl.ExitHandler(finish, name="tracked-run"):
            parent = step(start_run_op(config=config, kfp_run_id=run_id), "start_run", "Open MLflow run")
            parent_id = parent.output
            ingest = step(ingest_op(config=config, parent_run_id=parent_id), "ingest", "Ingest")
            # Fan out over ingest's shards (one shard for a handful of photos, many for a catalogue).
            with dsl.ParallelFor(
                ingest.outputs["Output"], parallelism=cfg.preprocess.parallel_shards
            ) as shard:
                preprocess = step(
                    preprocess_op(
                        config=config, kfp_run_id=run_id, images=ingest.outputs["dataset"], shard=shard
                    ),
                    "preprocess",
                    "Preprocess shard",
                )
            merge = step(
                merge_op(
                    config=config,
                    parent_run_id=parent_id,
                    shards=dsl.Collected(preprocess.outputs["dataset"]),
                ),
                "merge",
                "Merge shards",
            )
            caption = step(
                caption_op(config=config, parent_run_id=parent_id, images=merge.outputs["dataset"]),
                "caption",
                "Caption",
            )
            train = step(
                train_task(
                    config=config,
                    parent_run_id=parent_id,
                    kfp_run_id=run_id,
                    dataset=caption.outputs["dataset"],
                ),
                "train",
                "Train",
            )
            model = {model_input: train.outputs[model_input]}
            evaluate = step(
                evaluate_task(
                    config=config, parent_run_id=parent_id, dataset=caption.outputs["dataset"], **model
                ),
                "evaluate",
                "Evaluate",
            )
            step(
                register_task(
                    config=config,
                    parent_run_id=parent_id,
                    evaluation=evaluate.outputs["evaluation"],
                    **model,
                ),
                "register",
                "Register",
            )

    return personalize_pipeline
