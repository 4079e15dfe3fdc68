"""Cluster side of sdtune: render TrainJob/PyTorchJob specs and run them (plain Python, no kfp).

The kubernetes client is imported only when a job is actually launched against a cluster.
"""

from sdtune.cluster.errors import (
    ClusterAuthError,
    ClusterError,
    ClusterUnreachableError,
    TrainingJobFailed,
    TrainingJobTimeout,
)
from sdtune.cluster.jobs import (
    JobSpec,
    job_name,
    render,
    render_pytorchjob,
    render_trainjob,
    spec_from_config,
)
from sdtune.cluster.launch import launch_training
from sdtune.cluster.launcher import job_state, run_training_job

__all__ = [
    "ClusterAuthError",
    "ClusterError",
    "ClusterUnreachableError",
    "JobSpec",
    "TrainingJobFailed",
    "TrainingJobTimeout",
    "job_name",
    "job_state",
    "launch_training",
    "render",
    "render_pytorchjob",
    "render_trainjob",
    "run_training_job",
    "spec_from_config",
]
