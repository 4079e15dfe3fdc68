"""Outputs that travel by S3 URI and the run's staging cleanup, against a real S3-compatible server and a
real MLflow server (tests/servers.py): a full fine-tune's model is uploaded once, evaluated from one
download into the model cache and registered in place; a run that succeeded deletes its staged data,
job outputs and checkpoints, and nothing outside its own prefix."""

from __future__ import annotations

import pytest
from minio import Minio
from mlflow.tracking import MlflowClient

from sdtune import steps
from sdtune.cluster import outputs
from sdtune.config import load_config
from sdtune.errors import ConfigError
from sdtune.staging import prefix_size, upload_dir
from tests.servers import ACCESS_KEY, SECRET_KEY, make_bucket

STAGING = "s3://mlpipeline/private-artifacts/team-a/sdtune/staging"
FAST = [
    "train.max_steps=1",
    "evaluate.prompts=['a photo of {trigger} {class_noun}']",
    "evaluate.seeds=[0]",
    "evaluate.num_inference_steps=1",
    "evaluate.loss_seeds=[0]",
    "evaluate.loss_timesteps=[500]",
    "evaluate.image_metric_samples=1",
]


@pytest.fixture
def s3_env(s3_endpoint, tmp_path, monkeypatch):
    """A task pod's environment: S3 keys, the pod name KFP sets, private caches."""
    for name, value in {
        "S3_ENDPOINT_URL": s3_endpoint.url,
        "MLFLOW_S3_ENDPOINT_URL": s3_endpoint.url,  # a registry client loading a version stored in place
        "AWS_ACCESS_KEY_ID": ACCESS_KEY,
        "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
        "KFP_POD_NAME": "sdtune-run-train",
        "SDTUNE_HOME": str(tmp_path / "home"),
        "SDTUNE_CACHE_DIR": str(tmp_path / "cache" / "steps"),
    }.items():
        monkeypatch.setenv(name, value)
    make_bucket(s3_endpoint.url, "mlpipeline")
    return Minio(s3_endpoint.url.split("://")[1], ACCESS_KEY, SECRET_KEY, secure=False, region="us-east-1")


def _copies(client: Minio, file_name: str) -> list[str]:
    """Every object named ``file_name`` in every bucket of the store (MLflow's artifacts included)."""
    return [
        f"{bucket.name}/{obj.object_name}"
        for bucket in client.list_buckets()
        for obj in client.list_objects(bucket.name, recursive=True)
        if obj.object_name.endswith(file_name)
    ]


@pytest.mark.slow
def test_full_fine_tune_travels_by_uri_with_one_upload(
    tiny_assets, s3_env, mlflow_endpoint, tmp_path, monkeypatch
):
    import mlflow

    from sdtune.data.caption import caption_dir
    from sdtune.data.ingest import ingest
    from sdtune.data.preprocess import preprocess_dir
    from sdtune.generate import fetch_registered
    from sdtune.registry import load_registered

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_endpoint.url)
    mlflow.set_registry_uri(mlflow_endpoint.url)
    cfg = load_config(
        "configs/debug/tiny_cpu.yaml",
        [
            f"model.base={tiny_assets['model']}",
            "train.method=full",
            "cluster.namespace=team-a",
            "name=by-uri",
            "register.model_name=by-uri",
            "cache.enabled=false",
            *FAST,
        ],
    )
    assert outputs.outputs_by_uri(cfg)
    config = cfg.to_param()
    stage = tmp_path / "stage"
    ingest([str(tiny_assets["data"])], stage / "ingested", cfg.ingest)
    preprocess_dir(stage / "ingested", stage / "pre", cfg.preprocess)
    caption_dir(stage / "pre", stage / "data", cfg.caption)

    uri = outputs.outputs_location(cfg, "run-uri")
    assert uri == f"{STAGING}/run-uri/outputs"
    parent = steps.start_run(config, kfp_run_id="run-uri")
    summary = steps.train_step(config, parent, stage / "data", tmp_path / "work", "run-uri", model_uri=uri)
    assert summary["model_uri"] == uri and summary["method"] == "full"
    weights = "unet/diffusion_pytorch_model.safetensors"
    assert _copies(s3_env, weights) == [
        f"mlpipeline/private-artifacts/team-a/sdtune/staging/run-uri/outputs/{weights}"
    ]

    import sdtune.staging as staging

    fetched: list[str] = []
    original = staging.download_prefix
    monkeypatch.setattr(staging, "download_prefix", lambda u, d: fetched.append(u) or original(u, d))
    metrics = steps.evaluate_step(config, parent, stage / "data", uri, tmp_path / "evaluation")
    assert "loss_tuned_trigger" in metrics
    cached = outputs.fetch_model(uri)
    assert fetched == [uri] and (cached / "model_index.json").is_file()  # one download, then the cache

    result = steps.register_step(config, parent, uri, tmp_path / "evaluation")
    assert result["model_dir"] == uri
    client = MlflowClient(mlflow_endpoint.url, registry_uri=mlflow_endpoint.url)
    version = client.get_model_version_by_alias("by-uri", "candidate")
    assert version.source == uri
    train_run = client.get_run(summary["mlflow_run_id"])
    assert train_run.data.tags["sdtune.model_uri"] == uri
    assert train_run.data.params["train.gradient_checkpointing"] == "auto"  # as configured …
    assert train_run.data.params["train.gradient_checkpointing.resolved"] == "False"  # … and as it ran (CPU)
    assert train_run.data.params["train.mixed_precision.resolved"] == "no"
    assert client.list_artifacts(train_run.info.run_id, "model") == []  # not copied to MLflow
    # Still exactly one copy of the weights anywhere in the store, and the version loads from it.
    assert len(_copies(s3_env, weights)) == 1
    model = load_registered("models:/by-uri@candidate", tmp_path / "loaded")
    assert model.pipe.unet is not None
    # `sdtune generate models:/by-uri@candidate` finds the training output and its config in the version.
    run_cfg, folder = fetch_registered("models:/by-uri@candidate", tmp_path / "generate")
    assert run_cfg.train.method == "full" and (folder / "model_index.json").is_file()


def _seed_run(run_prefix: str, tmp_path) -> None:
    folder = tmp_path / "seed"
    folder.mkdir(exist_ok=True)
    (folder / "a.bin").write_bytes(b"x" * 10)
    for part in ("data", "out", "checkpoints", "outputs"):
        upload_dir(folder, f"{run_prefix}/{part}")


@pytest.mark.slow
def test_a_run_that_succeeded_deletes_its_staging_and_nothing_else(
    s3_env, mlflow_endpoint, tmp_path, capsys, monkeypatch
):
    from kfp import dsl

    from components.run import finish_run_op

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_endpoint.url)
    cfg = load_config("configs/sd15/full_1gpu.yaml", ["cluster.namespace=team-a"])
    mine, other = f"{STAGING}/run-1", f"{STAGING}/run-10"  # a sibling whose name starts like ours
    _seed_run(mine, tmp_path)
    _seed_run(other, tmp_path)

    def exit_handler(state: str, config=cfg) -> None:  # the pipeline's exit task, as KFP calls it
        status = dsl.PipelineTaskFinalStatus(state, "run-1", "tracked-run", None, None)
        finish_run_op.python_func(config=config.to_param(), kfp_run_id="run-1", status=status)

    # Failed (or still retrying): kept, a KFP "retry run" resumes from them under the same run id.
    exit_handler("FAILED")
    assert prefix_size(f"{mine}/data") == 10 and prefix_size(f"{mine}/checkpoints") == 10
    keep = cfg.model_copy(deep=True)
    keep.cluster.keep_staging = True
    exit_handler("SUCCEEDED", keep)
    assert prefix_size(f"{mine}/out") == 10

    exit_handler("SUCCEEDED")
    assert "deleted the run's staging: {'data': 1, 'out': 1, 'checkpoints': 1}" in capsys.readouterr().out
    for part in ("data", "out", "checkpoints"):
        assert prefix_size(f"{mine}/{part}") == 0
        assert prefix_size(f"{other}/{part}") == 10
    assert prefix_size(f"{mine}/outputs") == 10  # the registry points at it


@pytest.mark.parametrize(
    "uri",
    [
        f"{STAGING}/run-10/data",  # another run
        f"{STAGING}/run-1",  # the run prefix itself, outputs included
        f"{STAGING}/run-1/../run-2/data",
        f"{STAGING}",
        "s3://other-bucket/private-artifacts/team-a/sdtune/staging/run-1/data",
        "/tmp/run-1/data",
    ],
)
def test_deleting_outside_the_run_prefix_is_refused(uri, s3_env, tmp_path):
    _seed_run(f"{STAGING}/run-10", tmp_path)
    with pytest.raises(ConfigError, match="refusing to delete"):
        outputs.delete_run_part(uri, f"{STAGING}/run-1")
    assert prefix_size(f"{STAGING}/run-10/data") == 10


def test_run_ids_that_could_escape_the_prefix_are_refused():
    cfg = load_config("configs/sd15/full_1gpu.yaml", ["cluster.namespace=team-a"])
    for bad in ("", "..", "a/b", "x\n"):
        with pytest.raises(ConfigError, match="cannot name a staging prefix"):
            outputs.run_prefix(cfg, bad)


def test_only_large_outputs_travel_by_uri_unless_configured():
    cfg = load_config("configs/sd15/lora_1gpu.yaml", [])
    assert not outputs.outputs_by_uri(cfg)
    for method in ("full", "dreambooth"):
        cfg = load_config("configs/sd15/lora_1gpu.yaml", [f"train.method={method}"])
        assert outputs.outputs_by_uri(cfg)
        cfg.cluster.outputs_by = "artifact"
        assert not outputs.outputs_by_uri(cfg)
    cfg = load_config("configs/sd15/lora_1gpu.yaml", ["cluster.outputs_by=uri"])
    assert outputs.outputs_by_uri(cfg)


def test_local_runs_keep_outputs_in_a_folder(monkeypatch, tmp_path):
    monkeypatch.delenv("KFP_POD_NAME", raising=False)
    monkeypatch.setenv("SDTUNE_HOME", str(tmp_path))
    cfg = load_config("configs/sd15/full_1gpu.yaml", [])
    where = outputs.outputs_location(cfg, "local-run")
    assert where == str(tmp_path / "outputs" / "local-run")
    assert outputs.fetch_model(where) == tmp_path / "outputs" / "local-run"  # no store, no copy


def test_a_train_cache_hit_never_hands_on_a_uri_without_a_model(s3_env, tmp_path):
    """The step cache of a job-trained model holds only its summary: reuse the earlier run's URI while it
    holds the model, publish cached files when there are some, else train again (None)."""
    earlier, mine = f"{STAGING}/run-a/outputs", f"{STAGING}/run-b/outputs"
    summary_only = tmp_path / "summary-only"
    summary_only.mkdir()
    (summary_only / "train_summary.json").write_text("{}")
    assert steps._cached_outputs_at_uri({"model_uri": earlier}, summary_only, mine) is None

    _seed_run(f"{STAGING}/run-a", tmp_path)
    assert steps._cached_outputs_at_uri({"model_uri": earlier}, summary_only, mine)["model_uri"] == earlier

    with_files = tmp_path / "seed"
    assert steps._cached_outputs_at_uri({"model_uri": "gone"}, with_files, mine)["model_uri"] == mine
    assert prefix_size(mine) == 10
