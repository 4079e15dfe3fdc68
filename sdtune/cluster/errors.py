"""Errors of the cluster layer: each prints as one line through the CLI (see sdtune.errors)."""

from __future__ import annotations

from sdtune.errors import SdtuneError, TrainingError


class ClusterError(SdtuneError):
    """The cluster or the Kubeflow Pipelines API refused or could not do what was asked."""

    exit_code = 4


class NoClusterHost(ClusterError):
    """No KFP API host was given (a usage error: exit 2)."""

    exit_code = 2


class ClusterUnreachableError(ClusterError):
    """The KFP API host cannot be reached (DNS, refused connection, TLS, timeout)."""


class ClusterAuthError(ClusterError):
    """The KFP API answered 401/403: token, cookie or service account is missing or wrong."""


class TrainingJobFailed(TrainingError):
    """The TrainJob/PyTorchJob reached a failed terminal state; the KFP task fails with it."""


class TrainingJobTimeout(TrainingError):
    """The job did not finish within the configured timeout (it is deleted first)."""
