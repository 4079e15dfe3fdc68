"""Record a pushed image's digest for the pipeline compiler (``make images`` calls this after each push).

python images/record_digest.py NAME METADATA_JSON   # METADATA_JSON: docker buildx --metadata-file output
"""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from sdtune import __version__  # noqa: E402

DIGESTS = Path(__file__).resolve().parent / "digests.json"


def record(name: str, metadata: Path, digests: Path = DIGESTS) -> str:
    digest = json.loads(metadata.read_text())["containerimage.digest"]
    recorded = json.loads(digests.read_text()) if digests.is_file() else {}
    recorded[name] = {"version": __version__, "digest": digest}
    digests.write_text(json.dumps(recorded, indent=2, sort_keys=True) + "\n")
    return digest


if __name__ == "__main__":
    print(record(sys.argv[1], Path(sys.argv[2])))
