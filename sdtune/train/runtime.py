"""Process-level helpers every recipe uses: the Accelerator, dtypes, and loss bookkeeping without host syncs.

The same recipe runs as one process, under ``torchrun --nproc_per_node N`` or ``accelerate launch``: the
Accelerator reads the launcher's environment (gloo on CPU, NCCL on GPUs). Only rank 0 logs and saves.
"""

from __future__ import annotations

import time
import warnings
from pathlib import Path

import torch

from sdtune.config import TrainConfig
from sdtune.errors import TrainingError
from sdtune.tracking import CompositeLogger, JsonlLogger, MetricLogger

from .outputs import METRICS


def make_accelerator(tc: TrainConfig):
    """An Accelerator for this process; mixed precision only on GPUs (bf16/fp16 on CPU is ~20× slower)."""
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    precision = tc.mixed_precision
    if not cuda and precision != "no":
        warnings.warn(f"train.mixed_precision={precision} ignored on CPU: training in fp32", stacklevel=2)
        precision = "no"
    return Accelerator(mixed_precision=precision, cpu=not cuda)


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for frozen weights: half precision under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def open_logger(accelerator, out_dir: Path, extra: MetricLogger | None) -> MetricLogger | None:
    """Rank 0: ``metrics.jsonl`` (fresh each run) plus the caller's logger. Other ranks: None."""
    if not accelerator.is_main_process:
        return None
    (out_dir / METRICS).unlink(missing_ok=True)
    return CompositeLogger(JsonlLogger(out_dir / METRICS), extra)


class LossTracker:
    """Accumulates the loss on the device and reads it back only at log steps.

    ``add`` never synchronises with the host; ``flush`` averages over the interval and over ranks, and
    raises :class:`TrainingError` naming the first step whose loss was not finite.
    """

    def __init__(self, accelerator):
        self.acc = accelerator
        device = accelerator.device
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0 = none yet
        self.last_time = time.perf_counter()
        self.last_step = 0
        self.last_loss = float("nan")

    def add(self, loss: torch.Tensor, step: int) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss, torch.zeros_like(loss))
        self.count += 1
        self.first_bad = torch.where((self.first_bad == 0) & ~finite, torch.full_like(self.first_bad, step), self.first_bad)

    def flush(self, step: int) -> dict[str, float]:
        mean = self.acc.reduce(self.total / max(self.count, 1), reduction="mean")
        bad = self.acc.gather(self.first_bad.reshape(1))  # every rank sees every rank's failure
        bad = bad[bad > 0]
        if bad.numel():
            raise TrainingError(f"loss is not finite at step {int(bad.min().item())}; lower train.learning_rate?")
        now = time.perf_counter()
        steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_loss = float(mean.item())
        self.total.zero_()
        self.count = 0
        self.last_time, self.last_step = now, step
        return {"loss": self.last_loss, "steps_per_sec": steps_per_sec}


def progress(accelerator, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)


def shutdown(accelerator) -> None:
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
