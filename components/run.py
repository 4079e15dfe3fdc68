"""Run-level components: open the parent MLflow run, and close it from the pipeline's exit handler."""

from kfp import dsl

from components._images import SDTUNE_IMAGE


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def start_run_op(config: str, kfp_run_id: str) -> str:
    """Open the parent MLflow run (tagged with the KFP run id); returns its id for every later step."""
    from sdtune.steps import start_run

    return start_run(config, kfp_run_id=kfp_run_id)


@dsl.component(base_image=SDTUNE_IMAGE, install_kfp_package=False)
def finish_run_op(config: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Mark the parent MLflow run FINISHED or FAILED, whatever happened inside the pipeline; after a run
    that succeeded, delete what it staged (``sdtune.cluster.outputs.cleanup_after_run``)."""
    from sdtune.cluster.outputs import cleanup_after_run
    from sdtune.config import config_from_yaml
    from sdtune.steps import finish_run

    finish_run(config, kfp_run_id=kfp_run_id, pipeline_state=status.state, error=status.error_message)
    try:
        deleted = cleanup_after_run(config_from_yaml(config), kfp_run_id, status.state)
    except Exception as exc:  # staging left behind costs storage; it must not turn a good run red
        print(f"warning: staging of run {kfp_run_id} not deleted: {str(exc).splitlines()[0]}", flush=True)
    else:
        if deleted is not None:
            print(f"deleted the run's staging: {deleted}", flush=True)
