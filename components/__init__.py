"""Thin KFP components over ``sdtune.steps``. Module scope imports kfp and the stdlib only."""

from components.data import caption_op, ingest_op, merge_op, preprocess_op
from components.run import finish_run_op, start_run_op
from components.train import evaluate_op, register_op, train_op

__all__ = [
    "start_run_op",
    "finish_run_op",
    "ingest_op",
    "preprocess_op",
    "merge_op",
    "caption_op",
    "train_op",
    "evaluate_op",
    "register_op",
]
