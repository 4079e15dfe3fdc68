"""Run training as a child process: ``python -m sdtune.cli train`` for one process, ``torchrun`` for N.

This is what the KFP train component calls, so one component serves a CPU laptop, a 1-GPU pod and an
8-GPU pod alike. SIGTERM/SIGINT sent to this process (pod eviction, Ctrl-C) are forwarded to the child (no
shell in between to swallow them), and the child's exit code is returned — except that a run stopped by a
forwarded SIGTERM returns 75 (preempted, retryable) unless it failed permanently (2, 3, 5): torchrun itself
exits 1 when its workers stop on a signal. torchrun is given ``train.preempt_grace_s`` + 30 s before it
SIGKILLs its workers (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), so they can finish their checkpoint.

Multi-node (later): set ``SDTUNE_NNODES`` (>1), ``SDTUNE_NODE_RANK`` and ``SDTUNE_RDZV_ENDPOINT``
(``host:port``), optionally ``SDTUNE_RDZV_ID``; then torchrun uses c10d rendezvous instead of
``--standalone``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sdtune.config import RunConfig


def training_command(
    config_path: Path,
    data_dir: Path,
    out_dir: Path,
    num_processes: int,
    mlflow_run_id: str | None,
    overrides: list[str] | None = None,
    env: dict[str, str] | None = None,
) -> list[str]:
    """The argv that runs ``sdtune train`` with ``num_processes`` processes on this node."""
    env = dict(os.environ if env is None else env)
    args = ["train", "--config", str(config_path), "--data", str(data_dir), "--out", str(out_dir)]
    if mlflow_run_id:
        args += ["--mlflow-run-id", mlflow_run_id]
    args += list(overrides or [])
    nnodes = int(env.get("SDTUNE_NNODES", "1"))
    if num_processes <= 1 and nnodes <= 1:
        return [sys.executable, "-m", "sdtune.cli", *args]
    launcher = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={num_processes}"]
    if nnodes > 1:
        endpoint = env.get("SDTUNE_RDZV_ENDPOINT")
        if not endpoint:
            from sdtune.errors import ConfigError

            raise ConfigError("SDTUNE_NNODES > 1 needs SDTUNE_RDZV_ENDPOINT (host:port of node 0)")
        launcher += [
            f"--nnodes={nnodes}",
            f"--node_rank={env.get('SDTUNE_NODE_RANK', '0')}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={endpoint}",
            f"--rdzv_id={env.get('SDTUNE_RDZV_ID', 'sdtune')}",
        ]
    else:
        launcher.append("--standalone")
    return [*launcher, "-m", "sdtune.cli", *args]


def launch_training(
    config_path: Path,
    data_dir: Path,
    out_dir: Path,
    num_processes: int,
    mlflow_run_id: str | None,
    overrides: list[str] = [],  # noqa: B006 (read only; the documented signature)
    cfg: RunConfig | None = None,
) -> int:
    """Run training in a child process (no shell) and return its exit code. ``cfg``: the parsed config
    (``config_path`` with ``overrides`` applied) when the caller holds it, so it is not parsed again here."""
    cmd = training_command(config_path, data_dir, out_dir, num_processes, mlflow_run_id, list(overrides))
    from sdtune.errors import EXIT_PREEMPTED, PERMANENT_TRAINING_EXIT_CODES

    env = dict(os.environ)
    env.setdefault("PYTHONUNBUFFERED", "1")
    if num_processes > 1:
        # torchrun otherwise defaults every rank to 1 thread with a warning; keep an explicit choice.
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // num_processes)))
        grace_s = cfg.train.preempt_grace_s if cfg is not None else _grace_s(config_path, overrides)
        env.setdefault("TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(int(grace_s) + 30))
    child = subprocess.Popen(cmd, env=env)
    forwarded: list[int] = []

    def forward(signum, _frame):
        forwarded.append(signum)
        if child.poll() is None:
            child.send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        code = child.wait()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if signal.SIGTERM in forwarded and code != 0 and code not in PERMANENT_TRAINING_EXIT_CODES:
        return EXIT_PREEMPTED
    return code


def _grace_s(config_path: Path, overrides) -> float:
    try:
        from sdtune.config import load_config

        return load_config(config_path, list(overrides)).train.preempt_grace_s
    except Exception:  # the child reports a bad config with its own exit code
        return 60.0
