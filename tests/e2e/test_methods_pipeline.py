"""`sdtune run --local` with each training method on the tiny model (the lora run is in
test_local_pipeline.py). Kept fast: 2 steps, one prompt, one seed; the data stages hit the step cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tests.e2e.conftest import sdtune_cli
from tests.e2e.test_local_pipeline import _env

pytestmark = pytest.mark.slow

OUTPUT = {
    "textual_inversion": "learned_embeds.safetensors",
    "pivotal": "pytorch_lora_weights.safetensors",
    "dreambooth": "model_index.json",
    "full": "model.safetensors",
}
FAST = [
    "train.max_steps=2",
    "evaluate.prompts=['a photo of {trigger} {class_noun}']",
    "evaluate.seeds=[0]",
    "evaluate.num_inference_steps=1",
    "evaluate.loss_seeds=[0]",
    "evaluate.loss_timesteps=[500]",
]
PRIOR = ["train.num_class_images=2", "train.class_image_steps=1"]  # dreambooth's own options


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory):
    return tmp_path_factory.mktemp("methods-home")


@pytest.mark.parametrize("method", sorted(OUTPUT))
def test_pipeline_runs_each_method(method, tiny_assets, shared_home):
    # One of the runs also fans preprocessing out over 3 shards (12 sample images, 4 per shard).
    shards = ["ingest.shard_size=4"] if method == "textual_inversion" else []
    done = sdtune_cli(
        "run",
        "--local",
        "configs/debug/tiny_cpu.yaml",
        f"model.base={tiny_assets['model']}",
        f"ingest.sources=[{tiny_assets['data']}]",
        f"train.method={method}",
        f"name=e2e-{method}",
        f"register.model_name=e2e-{method}",
        *FAST,
        *(PRIOR if method == "dreambooth" else []),
        *shards,
        env=_env(shared_home),
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    model_dir = Path(
        next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("Model files"))
    )
    files = {p.name for p in model_dir.iterdir()}
    assert OUTPUT[method] in files, files
    summary = json.loads((model_dir / "train_summary.json").read_text())
    assert summary["method"] == method and summary["steps"] == 2
    if shards:
        uri = f"sqlite:///{shared_home / 'mlflow.db'}"
        client = MlflowClient(uri, registry_uri=uri)
        parent = next(line.split()[-1] for line in done.stdout.splitlines() if line.startswith("MLflow run"))
        steps = {
            r.info.run_name
            for r in client.search_runs(
                [client.get_run(parent).info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent}'"
            )
        }
        assert {"preprocess-0000", "preprocess-0001", "preprocess-0002", "merge", "caption"} <= steps
