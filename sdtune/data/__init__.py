"""Data stages: ingest → preprocess → caption, plus a synthetic sample dataset.

Each stage reads a directory (or sources) and writes a stage directory (``manifest.jsonl`` + ``report.json``,
see :mod:`sdtune.manifest`). Reason codes are listed in :mod:`sdtune.data.reasons` and ``docs/data.md``.
"""

from sdtune.data.caption import caption_dir
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import preprocess_dir
from sdtune.data.sample import write_sample_dataset
from sdtune.data.shards import merge_stages, read_shards

__all__ = ["caption_dir", "ingest", "merge_stages", "preprocess_dir", "read_shards", "write_sample_dataset"]
