"""User-facing errors: one clear line, a documented exit code, never a traceback."""

from __future__ import annotations


class SdtuneError(Exception):
    """Base for errors that the CLI prints as one line and turns into an exit code."""

    exit_code = 1


class ConfigError(SdtuneError):
    """A config file or override is invalid."""

    exit_code = 2


class DatasetError(SdtuneError):
    """The input data cannot make a usable dataset (too few images, too many rejected, bad source)."""

    exit_code = 2


class TrainingError(SdtuneError):
    """Training cannot continue (diverged, incompatible checkpoint)."""

    exit_code = 3
