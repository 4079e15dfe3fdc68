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


def cpu_has_bf16_instructions(capabilities=None) -> bool:
    """Whether this CPU multiplies bf16 in hardware (AVX-512 BF16 or AMX-BF16); without them bf16 is emulated."""
    caps = torch.cpu.get_capabilities() if capabilities is None else capabilities
    return bool(caps.get("avx512_bf16") or caps.get("amx_bf16"))


def cpu_precision(requested: str, capabilities=None) -> tuple[str, str | None]:
    """The precision a CPU run uses for ``train.mixed_precision=requested``, and why it differs, if it does.

    bf16 autocast pays on a CPU only with bf16 instructions (the SD-1.5-shaped bench UNet's LoRA step: 1.26×
    faster eager and 1.30× compiled on an AMD EPYC with AVX-512 BF16; the tiny UNet at batch 1 is 0.87–0.93× —
    too small to gain); without them it was ~20× slower than fp32. fp16 autocast is slow on every CPU here.
    """
    if requested == "no" or (requested == "bf16" and cpu_has_bf16_instructions(capabilities)):
        return requested, None
    why = (
        "this CPU has no bf16 instructions (AVX-512 BF16 or AMX)"
        if requested == "bf16"
        else "fp16 is slow on CPUs"
    )
    return "no", f"train.mixed_precision={requested} ignored on CPU ({why}): training in fp32"


def make_accelerator(tc: TrainConfig):
    """An Accelerator for this process; on a CPU mixed precision only where it pays (:func:`cpu_precision`)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    cuda = torch.cuda.is_available()
    precision = tc.mixed_precision
    if not cuda:
        precision, why = cpu_precision(precision)
        if why:
            warnings.warn(why, stacklevel=2)
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        # accelerate keeps the first Accelerator's precision for the whole process and raises on another one;
        # a process may train several runs (a notebook, a test session), so this run's precision replaces it.
        # The process group (PartialState) is kept.
        AcceleratorState._reset_state(reset_partial_state=False)
    return Accelerator(mixed_precision=precision, cpu=not cuda)


def weight_dtype(accelerator) -> torch.dtype:
    """dtype for frozen weights: half precision under mixed precision, else fp32."""
    return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)


def open_logger(
    accelerator, out_dir: Path, extra: MetricLogger | None, resume_step: int = 0
) -> MetricLogger | None:
    """Rank 0: ``metrics.jsonl`` plus the caller's logger. Other ranks: None.

    A fresh run starts the file empty; a resumed one keeps the rows up to the checkpoint's step and drops
    the later ones (the steps that will be trained again), so the file reads as one uninterrupted run.
    """
    if not accelerator.is_main_process:
        return None
    path = out_dir / METRICS
    if resume_step and path.is_file():
        import json

        kept = [
            line
            for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= resume_step
        ]
        path.write_text("".join(f"{line}\n" for line in kept), encoding="utf-8")
    else:
        path.unlink(missing_ok=True)
    return CompositeLogger(JsonlLogger(path), extra)


def make_optimizer(tc: TrainConfig, params):
    """AdamW (real runs), 8-bit AdamW (``train.optimizer=adamw8bit``: bitsandbytes on a GPU) or plain SGD
    (``train.optimizer=sgd``: no momentum, so N ranks × batch b and one rank × batch N·b give the same weights
    to fp32 round-off; Adam's normalisation amplifies that round-off).

    ``params``: tensors, or param groups (dicts with ``params`` and their own ``lr``)."""
    params = list(params)
    tensors = [p for g in params for p in (g["params"] if isinstance(g, dict) else [g])]
    if tc.optimizer == "sgd":
        return torch.optim.SGD(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)
    if tc.optimizer == "adamw8bit":
        return _adamw8bit(tc, params, tensors)
    # The fused kernel turns the per-parameter update loop into a few launches (GPU) or one pass (CPU:
    # tiny 2.2 → 0.7 ms, medium 28 → 5.5 ms per step, docs/performance.md); same update, other rounding.
    devices = {p.device.type for p in tensors}
    fused = bool(tensors) and len(devices) == 1 and devices <= {"cpu", "cuda"}
    if capturable_step(tc, devices):
        return adamw_with_tensor_lr(tc, params, tensors[0].device, capturable=True)
    return torch.optim.AdamW(
        params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay, fused=fused or None
    )


def capturable_step(tc: TrainConfig, devices: set[str]) -> bool:
    """Whether the optimizer step must be CUDA-graph safe: ``train.compile=graphs`` with every trainable
    tensor on a CUDA device. Elsewhere the plain fused AdamW with a float learning rate is as fast."""
    return tc.compile == "graphs" and tc.optimizer == "adamw" and devices == {"cuda"}


def adamw_with_tensor_lr(
    tc: TrainConfig, params, device: torch.device, capturable: bool
) -> torch.optim.AdamW:
    """Fused AdamW whose learning rates are 0-d tensors on ``device`` (``capturable``: its step count lives
    there too), so a CUDA graph can capture ``optimizer.step()``: nothing in it reads a host value. The LR
    schedule writes each new rate into the same tensor (``LRScheduler`` fills tensor rates in place), and a
    resumed optimizer state is copied into those tensors rather than replacing them (a captured graph keeps
    reading the tensor it was captured with). Same update as a float rate: tests/train/test_optimizer.py."""

    def rate(value: float) -> torch.Tensor:
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    groups = [{**g, "lr": rate(g.get("lr", tc.learning_rate))} if isinstance(g, dict) else g for g in params]
    optimizer = torch.optim.AdamW(
        groups,
        lr=rate(tc.learning_rate),
        weight_decay=tc.adam_weight_decay,
        fused=True,
        capturable=capturable,
    )
    rates = [g["lr"] for g in optimizer.param_groups]

    def keep_rate_tensors(opt: torch.optim.Optimizer) -> None:
        for group, tensor in zip(opt.param_groups, rates, strict=True):
            tensor.copy_(group["lr"])  # a checkpoint's rate, loaded on the CPU, into the device tensor
            group["lr"] = tensor

    optimizer.register_load_state_dict_post_hook(keep_rate_tensors)
    return optimizer


def _adamw8bit(tc: TrainConfig, params, tensors):
    """bitsandbytes' AdamW8bit, or one ConfigError line saying why it cannot be used here."""
    from sdtune.errors import ConfigError

    try:
        import bitsandbytes as bnb
    except ImportError:
        raise ConfigError(
            "train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes), which is not installed; "
            "use train.optimizer=adamw"
        ) from None
    if not torch.cuda.is_available() or not all(p.is_cuda for p in tensors):
        raise ConfigError(
            "train.optimizer=adamw8bit needs a CUDA GPU (bitsandbytes' 8-bit states live on the GPU); "
            "this run is on CPU: use train.optimizer=adamw"
        )
    return bnb.optim.AdamW8bit(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)


class LossTracker:
    """Accumulates the loss on the device and reads it back only at log steps and before checkpoints.

    ``add`` never synchronises with the host; ``flush`` averages over the interval and over ranks. ``check``
    (called by ``flush`` and before every checkpoint, so a diverged state is never saved) raises
    :class:`TrainingError` naming the first step whose loss was not finite, the rank and the batch's images.
    """

    def __init__(self, accelerator, names: list[str] | None = None):
        self.acc = accelerator
        self.names = names
        device = accelerator.device
        self.total = torch.zeros((), device=device)
        self.count = 0
        self.first_bad = torch.zeros((), dtype=torch.long, device=device)  # 0 = none yet
        self.bad_batch = torch.full((0,), -1, dtype=torch.long, device=device)
        self.last_time = time.perf_counter()
        self.last_step = 0
        self.last_loss = float("nan")

    def add(self, loss: torch.Tensor, step: int, batch: torch.Tensor | None = None) -> None:
        loss = loss.detach().float()
        finite = torch.isfinite(loss)
        self.total += torch.where(finite, loss, torch.zeros_like(loss))
        self.count += 1
        first = (self.first_bad == 0) & ~finite
        self.first_bad = torch.where(first, torch.full_like(self.first_bad, step), self.first_bad)
        if batch is not None:
            if self.bad_batch.numel() != batch.numel():
                self.bad_batch = torch.full_like(batch, -1)
            self.bad_batch = torch.where(first, batch, self.bad_batch)

    def check(self) -> None:
        bad = self.acc.gather(self.first_bad.reshape(1))  # every rank sees every rank's failure
        if not bool((bad > 0).any()):
            return
        step = int(bad[bad > 0].min().item())
        mine = ""
        if int(self.first_bad.item()) == step:
            idx = [i for i in self.bad_batch.tolist() if i >= 0]
            shown = [self.names[i] for i in idx] if self.names else idx
            mine = f"rank {self.acc.process_index} batch {shown}"
        where = [w for w in all_gather_objects(mine) if w]
        raise TrainingError(
            f"loss is not finite at step {step} ({'; '.join(where)}); stopped without writing a checkpoint; "
            "lower train.learning_rate?"
        )

    def flush(self, step: int) -> dict[str, float]:
        mean = self.acc.reduce(self.total / max(self.count, 1), reduction="mean")
        self.check()
        now = time.perf_counter()
        steps_per_sec = (step - self.last_step) / max(now - self.last_time, 1e-9)
        self.last_loss = float(mean.item())
        self.total.zero_()
        self.count = 0
        self.last_time, self.last_step = now, step
        return {"loss": self.last_loss, "steps_per_sec": steps_per_sec}


def all_gather_objects(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in a single process)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [obj]
    out = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, obj)
    return out


def replicas_identical(module: torch.nn.Module, accelerator) -> bool | None:
    """DDP: do all ranks hold bit-identical trainable weights? (sha256 of the bytes, compared across ranks;
    None for one process.) Cheap for a LoRA; run once, at the end."""
    if accelerator.num_processes == 1:
        return None
    import hashlib

    digest = hashlib.sha256()
    for _, param in sorted(module.named_parameters()):
        if param.requires_grad:
            digest.update(param.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return len(set(all_gather_objects(digest.hexdigest()))) == 1


class PreemptWatch:
    """SIGTERM (pod eviction, spot reclaim, ``launch_training`` forwarding) → stop at a step boundary.

    The handler only sets a flag; :meth:`should_stop` ORs the flags of all ranks so every rank stops after the
    SAME step and they write one consistent checkpoint together. With more than one process that OR is a
    scalar all_reduce over a host-side (gloo) group, started asynchronously after step s and read after step
    s + 1: the device never waits for it (an all_reduce of a CUDA tensor plus ``.item()`` in every step would
    stall the GPU queue), and the stop comes one step later, on every rank alike. A
    watchdog started by the signal ends the process with exit 75 after ``grace_s`` whatever it is doing
    (a long setup, a hung collective): the previous complete checkpoint is still there, because writes
    are atomic.
    """

    def __init__(self, accelerator, grace_s: float):
        import signal
        import threading

        self.acc, self.grace_s = accelerator, grace_s
        self.requested_at: float | None = None
        self._group = None
        self._pending: tuple | None = None  # (work, tensor) of the OR started after the previous step
        self._timer: threading.Timer | None = None
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, _frame) -> None:
        import threading

        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic()
        self._timer = threading.Timer(self.grace_s, self._give_up)
        self._timer.daemon = True
        self._timer.start()

    def _give_up(self) -> None:
        import os
        import sys

        from sdtune.errors import EXIT_PREEMPTED

        print(
            f"error: preempted and no checkpoint completed within train.preempt_grace_s={self.grace_s:g}s; "
            "exiting (the previous complete checkpoint stays valid)",
            file=sys.stderr,
            flush=True,
        )
        os._exit(EXIT_PREEMPTED)

    def should_stop(self) -> bool:
        flag = self.requested_at is not None
        if self.acc.num_processes == 1:
            return flag
        dist = torch.distributed
        if self._group is None:  # every rank reaches its first step end: a safe place for a collective
            self._group = dist.new_group(backend="gloo")
        stop = False
        if self._pending is not None:
            work, seen = self._pending
            work.wait()
            stop = bool(seen.item() > 0)  # a host tensor: no device sync
        seen = torch.tensor([1.0 if flag else 0.0])
        self._pending = (dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=self._group, async_op=True), seen)
        return stop

    def seconds_since_signal(self) -> float:
        return 0.0 if self.requested_at is None else time.monotonic() - self.requested_at

    def close(self) -> None:
        import signal

        if self._pending is not None:  # no collective may be in flight when the process group goes away
            self._pending[0].wait()
            self._pending = None
        if self._timer is not None:
            self._timer.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def progress(accelerator, total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not accelerator.is_main_process, dynamic_ncols=True)


def shutdown(accelerator) -> None:
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


def report_step(step, tc: TrainConfig, tracker, lr_scheduler, grad_norm, bar, log, extra=None) -> None:
    """Every ``train.log_every`` steps (and the last): read the loss back (the one host sync, which also
    checks it is finite), add lr/grad-norm and any recipe-specific ``extra()`` metrics, log them."""
    if step % tc.log_every and step != tc.max_steps:
        return
    metrics = tracker.flush(step)
    metrics.update(lr=float(lr_scheduler.get_last_lr()[0]), grad_norm=float(grad_norm))  # tensor rates too
    if extra is not None:
        metrics.update(extra())
    bar.set_postfix(loss=f"{metrics['loss']:.4f}")
    if log is not None:
        log.log(metrics, step)
