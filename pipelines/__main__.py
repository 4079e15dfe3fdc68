"""`python -m pipelines [CONFIG] [OUT]`: compile the personalisation pipeline to YAML."""

import sys
from pathlib import Path

from pipelines.compile import compile_pipeline
from sdtune.config import load_config

config = sys.argv[1] if len(sys.argv) > 1 else None
out = Path(sys.argv[2] if len(sys.argv) > 2 else "dist/pipelines/personalize.yaml")
print(compile_pipeline(load_config(config), out))
