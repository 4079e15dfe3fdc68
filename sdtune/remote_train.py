"""Entry point of a multi-node training job's pods (``torchrun -m sdtune.remote_train …``).

Every rank downloads the captioned dataset from the staging prefix, trains through the same recipe as
``sdtune train`` (the Kubeflow Trainer / Training Operator runtime has set up torchrun's rendezvous), and
rank 0 uploads the outputs. Exit codes are those of ``sdtune train`` (2: bad config or data, not retried).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sdtune.remote_train")
    parser.add_argument("--config-json", required=True, help="the run config (RunConfig.to_param())")
    parser.add_argument("--data", required=True, help="s3:// prefix of the captioned stage directory")
    parser.add_argument("--out", required=True, help="s3:// prefix the outputs are uploaded to")
    parser.add_argument("--mlflow-run-id", default=None)
    args = parser.parse_args(argv)

    from sdtune.cli import main as cli_main
    from sdtune.staging import download_prefix, upload_dir

    with tempfile.TemporaryDirectory(prefix="sdtune-job-") as tmp:
        work = Path(tmp)
        data, out = work / "data", work / "out"
        download_prefix(args.data, data)
        config = work / "config.yaml"
        config.write_text(args.config_json, encoding="utf-8")
        cli_args = ["train", "--config", str(config), "--data", str(data), "--out", str(out)]
        if args.mlflow_run_id:
            cli_args += ["--mlflow-run-id", args.mlflow_run_id]
        code = cli_main(cli_args)
        if code == 0 and int(os.environ.get("RANK", "0")) == 0:
            upload_dir(out, args.out)
        return code


if __name__ == "__main__":
    sys.exit(main())
