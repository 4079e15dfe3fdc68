"""Entry point of a multi-node training job's pods (``torchrun -m sdtune.remote_train …``).

torchrun starts this once per rank. The captioned dataset is downloaded once per node: local rank 0
fetches it from the staging prefix into a folder shared by the node's ranks and marks it complete, the
others wait for the mark (a lock-free rendezvous on the pod's disk). Every rank then trains through the
same recipe as ``sdtune train``; rank 0 uploads the outputs and, on success, deletes the staged dataset.
The node's local copy is deleted by the last rank to finish. Exit codes are those of ``sdtune train``
(2: bad config or data, not retried).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

READY = ".sdtune-staged"
WAIT_S = 6 * 3600  # a large dataset on a slow store; a stuck local rank 0 fails the job instead


def node_stage_dir(data_uri: str, root: Path | None = None) -> Path:
    """The folder the ranks of one node share for ``data_uri`` (same path for every rank of the job)."""
    digest = hashlib.sha256(data_uri.encode()).hexdigest()[:16]
    return Path(root or tempfile.gettempdir()) / f"sdtune-stage-{digest}"


def stage_once_per_node(
    data_uri: str, local_rank: int, root: Path | None = None, poll_s: float = 1.0, wait_s: float = WAIT_S
) -> Path:
    """Local rank 0 downloads ``data_uri``; the other local ranks wait until it is complete."""
    from sdtune.errors import TrainingError
    from sdtune.staging import download_prefix

    stage = node_stage_dir(data_uri, root)
    data, ready = stage / "data", stage / READY
    if local_rank == 0:
        if not ready.is_file():
            shutil.rmtree(data, ignore_errors=True)  # a partial copy from a restarted pod
            download_prefix(data_uri, data)
            ready.write_text(str(os.getpid()))
        return data
    deadline = time.monotonic() + wait_s
    while not ready.is_file():
        if time.monotonic() > deadline:
            raise TrainingError(f"local rank 0 did not stage {data_uri} within {wait_s:.0f}s")
        time.sleep(poll_s)
    return data


def release_stage(stage: Path, local_rank: int, ranks_on_node: int) -> None:
    """Count this rank out; the last one deletes the node's copy of the dataset."""
    done = stage / "done"
    done.mkdir(parents=True, exist_ok=True)
    (done / str(local_rank)).touch()
    if len(list(done.iterdir())) >= ranks_on_node:
        shutil.rmtree(stage, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.remote_train")
    parser.add_argument("--config-json", required=True, help="the run config (RunConfig.to_param())")
    parser.add_argument("--data", required=True, help="s3:// prefix of the captioned stage directory")
    parser.add_argument("--out", required=True, help="s3:// prefix the outputs are uploaded to")
    parser.add_argument("--mlflow-run-id", default=None)
    args = parser.parse_args(argv)

    from sdtune.cli import main as cli_main
    from sdtune.staging import delete_prefix, upload_dir

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    ranks_on_node = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    data = stage_once_per_node(args.data, local_rank)
    try:
        with tempfile.TemporaryDirectory(prefix="sdtune-job-") as tmp:
            work = Path(tmp)
            out = work / "out"
            config = work / "config.yaml"
            config.write_text(args.config_json, encoding="utf-8")
            cli_args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
            if args.mlflow_run_id:
                cli_args += ["--mlflow-run-id", args.mlflow_run_id]
            code = cli_main(cli_args)
            if code == 0 and int(os.environ.get("RANK", "0")) == 0:
                upload_dir(out, args.out)
                delete_prefix(args.data)  # the outputs are safe; a retry attaches to this finished job
            return code
    finally:
        release_stage(data.parent, local_rank, ranks_on_node)


if __name__ == "__main__":
    sys.exit(main())
