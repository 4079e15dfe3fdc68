"""Data components: thin wrappers mapping KFP artifacts onto ``sdtune.steps``."""

from kfp import dsl

from components._images import SDTUNE_IMAGE


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def ingest_op(config: str, parent_run_id: str, dataset: dsl.Output[dsl.Dataset], report: dsl.Output[dsl.Markdown]):
    """Ingest ``ingest.sources`` into a stage directory."""
    from sdtune.steps import ingest_step, write_report_markdown

    ingest_step(config, parent_run_id, dataset.path)
    write_report_markdown(dataset.path, report.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def preprocess_op(
    config: str, parent_run_id: str, images: dsl.Input[dsl.Dataset], dataset: dsl.Output[dsl.Dataset],
    report: dsl.Output[dsl.Markdown],
):
    """Crop, resize and upscale to the training resolution."""
    from sdtune.steps import preprocess_step, write_report_markdown

    preprocess_step(config, parent_run_id, images.path, dataset.path)
    write_report_markdown(dataset.path, report.path)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def caption_op(config: str, parent_run_id: str, images: dsl.Input[dsl.Dataset], dataset: dsl.Output[dsl.Dataset]):
    """Caption every image and split off the held-out images."""
    from sdtune.steps import caption_step

    caption_step(config, parent_run_id, images.path, dataset.path)
