"""One implementation in its own process (so its peak RSS is its own), timed in windows the parent paces.

``python -m sdtune.bench.worker IMPL CONFIG DATA OUT --window W --windows K``; IMPL is one of :data:`IMPLS`:
the trainer (eager), the trainer with ``train.compile=default|regional``, or the reference loop.

Protocol (JSON lines on the original stdout; everything else goes to stderr): after each window of W steps
the worker writes ``{"window": i, "seconds": s, "loss": mean loss of the window}`` and waits for a line on
stdin before the next one, so the parent can alternate the two implementations window by window. At the end
it writes ``{"done": true, "final_loss": …, "peak_rss_mb": …}``.

The trainer is the real :func:`sdtune.train.lora.train`, unmodified: its logger (called every ``log_every``
= W steps, right after the loop's only host sync) is where the window ends and the pause happens. A window's
time runs from the end of one pause to the next call of the logger, so pauses are never counted.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path


def _peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # Linux: KiB


class Channel:
    def __init__(self) -> None:
        self.out = os.fdopen(os.dup(1), "w", buffering=1)
        os.dup2(2, 1)  # library prints (progress bars, warnings) go to stderr
        sys.stdout = sys.stderr

    def send(self, **msg) -> None:
        self.out.write(json.dumps(msg) + "\n")
        self.out.flush()

    def wait(self) -> None:
        if not sys.stdin.readline():
            raise SystemExit("parent went away")


class PacedLogger:
    """The trainer's MetricLogger: reports each window and blocks until the parent says go."""

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.window = 0
        self.resumed = time.perf_counter()

    def log(self, metrics, step: int) -> None:
        seconds = time.perf_counter() - self.resumed
        self.channel.send(window=self.window, step=step, seconds=seconds, loss=float(metrics["loss"]))
        self.window += 1
        self.channel.wait()
        self.resumed = time.perf_counter()

    def close(self) -> None:
        pass


IMPLS = ("trainer", "trainer+compile=default", "trainer+compile=regional", "reference")


def impl_overrides(impl: str) -> list[str]:
    """The config overrides an IMPL adds: one of :data:`IMPLS`, optionally followed by ``+bf16``
    (``train.mixed_precision=bf16``: bf16 autocast over bf16 frozen weights, where the CPU has bf16
    instructions). Anything else is an error."""
    base, bf16 = impl.removesuffix("+bf16"), impl.endswith("+bf16")
    if base not in IMPLS:
        raise ValueError(f"unknown implementation {impl!r}: one of {', '.join(IMPLS)}, each optionally +bf16")
    overrides = [f"train.compile={base.split('+compile=')[1]}"] if "+compile=" in base else []
    return overrides + (["train.mixed_precision=bf16"] if bf16 else [])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("impl", help="one of " + ", ".join(IMPLS) + ", each optionally +bf16")
    p.add_argument("config")
    p.add_argument("data")
    p.add_argument("out")
    p.add_argument("--window", type=int, required=True)
    p.add_argument("--windows", type=int, required=True, help="windows in all, warm-up included")
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from sdtune.config import load_config

    channel = Channel()
    steps = args.window * args.windows
    overrides = [f"train.max_steps={steps}", f"train.log_every={args.window}", *impl_overrides(args.impl)]
    cfg = load_config(args.config, overrides)

    if args.impl.startswith("trainer"):
        from sdtune.train.lora import train

        result = train(cfg, Path(args.data), Path(args.out), logger=PacedLogger(channel))
        final_loss = result.final_loss
    else:
        from sdtune.bench.reference import ReferenceLoRA

        started = time.perf_counter()
        ref = ReferenceLoRA.build(cfg, Path(args.data))
        for window in range(args.windows):
            if window:
                started = time.perf_counter()
            losses = ref.run(args.window)
            seconds = time.perf_counter() - started
            channel.send(
                window=window,
                step=(window + 1) * args.window,
                seconds=seconds,
                loss=sum(losses) / len(losses),
            )
            channel.wait()
        final_loss = sum(ref.losses[-args.window :]) / args.window
    channel.send(done=True, final_loss=final_loss, peak_rss_mb=_peak_rss_mb())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
