"""Hyperparameter and prompt sweeps: a search space becomes trials, trials become tracked runs, the best one
is registered (through the champion gate).

Plain Python, no kfp: ``space`` expands grids/ranges/prompt files into trial overrides, ``select`` picks the
best trial, ``trial`` runs one trial (data stages only when the trial changes them, train, evaluate),
``tracking`` holds the sweep's MLflow runs, ``page`` renders the comparison page, ``katib`` renders and
follows a Katib Experiment. ``pipelines/sweep.py`` fans the trials out with ``dsl.ParallelFor``.
"""

from sdtune.sweep.select import SweepFailed, TrialResult, select_best
from sdtune.sweep.space import Trial, build_trials, parse_grid_option, read_prompts, trial_config

__all__ = [
    "SweepFailed",
    "Trial",
    "TrialResult",
    "build_trials",
    "parse_grid_option",
    "read_prompts",
    "select_best",
    "trial_config",
]
