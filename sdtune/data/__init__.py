"""Data stages: ingest → preprocess → caption, plus a synthetic sample dataset.

Each stage reads a directory (or sources) and writes a stage directory (``manifest.jsonl`` + ``report.json``,
see :mod:`sdtune.manifest`). Reason codes are listed in :mod:`sdtune.data.reasons` and ``docs/data.md``.
"""

from sdtune.data.caption import caption_dir
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import preprocess_dir
from sdtune.data.sample import write_sample_dataset

__all__ = ["caption_dir", "ingest", "preprocess_dir", "write_sample_dataset"]
