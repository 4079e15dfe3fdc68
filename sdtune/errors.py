"""User-facing errors: one clear line, a documented exit code, never a traceback."""

from __future__ import annotations


class SdtuneError(Exception):
    """Base for errors that the CLI prints as one line and turns into an exit code."""

    exit_code = 1


class ConfigError(SdtuneError):
    """A config file or override is invalid."""

    exit_code = 2


class UsageError(SdtuneError):
    """The command line names something that does not exist or is ambiguous (a run id, a folder)."""

    exit_code = 2


class DatasetError(SdtuneError):
    """The input data cannot make a usable dataset (too few images, too many rejected, bad source)."""

    exit_code = 2


class ModelLoadError(SdtuneError):
    """The base model cannot be found or read."""

    exit_code = 2


class ServiceError(SdtuneError):
    """A service (MLflow, the cluster API, S3) cannot be reached or answers with an error. Retryable."""

    exit_code = 4


class TrainingError(SdtuneError):
    """Training cannot continue (diverged, incompatible checkpoint)."""

    exit_code = 3


# Training exit codes (docs/distributed.md). A cluster launcher retries every non-zero code EXCEPT the
# permanent ones (2, 3, 5): a retry would fail the same way. 75 (preempted) is the one meant for a retry,
# which resumes from the checkpoint written on the way out.
EXIT_PREEMPTED = 75  # EX_TEMPFAIL (sysexits.h)
EXIT_OUT_OF_MEMORY = 5
PERMANENT_TRAINING_EXIT_CODES = frozenset({2, 3, EXIT_OUT_OF_MEMORY})


class CheckpointError(SdtuneError):
    """A checkpoint cannot be used: written by an incompatible config or world size, or damaged when named
    explicitly (``train.resume=PATH``). Permanent: resuming again would be refused again."""

    exit_code = 2


class Preempted(SdtuneError):
    """SIGTERM (pod eviction, spot reclaim): a checkpoint was written; run again to resume. Retryable."""

    exit_code = EXIT_PREEMPTED


class OutOfMemory(SdtuneError):
    """The accelerator ran out of memory with these settings; the message names settings that fit. Permanent."""

    exit_code = EXIT_OUT_OF_MEMORY


EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C


class Interrupted(SdtuneError):
    """Ctrl-C: what had finished is said in the message; MLflow runs are closed as KILLED."""

    exit_code = EXIT_INTERRUPTED
