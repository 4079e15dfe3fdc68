"""Data components: thin wrappers mapping KFP artifacts onto ``sdtune.steps``."""

from kfp import dsl

from components._images import SDTUNE_IMAGE


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def ingest_op(
    config: str, parent_run_id: str, dataset: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.Markdown]
) -> list[int]:
    """Ingest ``ingest.sources`` into a stage directory; returns its shard ids (``ingest.shard_size``)."""
    from sdtune.steps import ingest_step, list_shards, write_report_markdown

    ingest_step(config, parent_run_id, dataset.path)
    write_report_markdown(dataset.path, report.path)
    return list_shards(dataset.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def preprocess_op(
    config: str,
    kfp_run_id: str,
    images: dsl.Input[dsl.Dataset],
    shard: int,
    dataset: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.Markdown],
):
    """Crop, resize and upscale one shard to the training resolution.

    Takes the KFP run id, not the parent MLflow run id: inside a ParallelFor, kfp.local 2.17 replaces every
    task-output parameter with the loop item, so the parent run is looked up by its ``kfp.run_id`` tag."""
    from sdtune.steps import preprocess_step, write_report_markdown

    preprocess_step(config, "", images.path, dataset.path, shard=int(shard), kfp_run_id=kfp_run_id)
    write_report_markdown(dataset.path, report.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def merge_op(
    config: str, parent_run_id: str, shards: dsl.Input[list[dsl.Dataset]], dataset: dsl.Output[dsl.Dataset]
):
    """Join the preprocessed shards into one stage directory."""
    from sdtune.steps import merge_step

    merge_step(config, parent_run_id, [shard.path for shard in shards], dataset.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def caption_op(
    config: str, parent_run_id: str, images: dsl.Input[dsl.Dataset], dataset: dsl.Output[dsl.Dataset]
):
    """Caption every image and split off the held-out images."""
    from sdtune.steps import caption_step

    caption_step(config, parent_run_id, images.path, dataset.path)
