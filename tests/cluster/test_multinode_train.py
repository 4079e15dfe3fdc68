"""The multi-node training path, end to end on this machine: the train step stages the dataset to a real
S3-compatible server, "submits" a TrainJob to a fake Kubernetes API that runs the job's container command
here (torchrun replaced by the interpreter: one node, one process), and fetches the outputs back."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from sdtune import steps
from sdtune.config import load_config
from sdtune.data.caption import caption_dir
from sdtune.data.ingest import ingest
from sdtune.data.preprocess import preprocess_dir
from sdtune.staging import prefix_size
from tests.cluster.kubelet import expand
from tests.servers import ACCESS_KEY, SECRET_KEY, make_bucket

pytestmark = pytest.mark.slow


class LocalJobApi:
    """CustomObjectsApi stand-in: creating a job runs its trainer command locally, to completion."""

    def __init__(self):
        self.bodies: list[dict] = []

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        self.bodies.append(body)
        trainer = body["spec"]["trainer"]
        assert trainer["command"] == ["torchrun"]
        args = [expand(a, {}) for a in trainer["args"]]  # the kubelet's $(VAR) pass
        env = {**os.environ, **{e["name"]: expand(e["value"], {}) for e in trainer["env"] if "value" in e}}
        env["OMP_NUM_THREADS"] = "1"
        done = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=600, env=env)
        self.log = done.stdout + done.stderr
        kind = "Complete" if done.returncode == 0 else "Failed"
        body["status"] = {"conditions": [{"type": kind, "status": "True", "message": self.log[-500:]}]}
        self.exit_code = done.returncode
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        for body in self.bodies:
            if body["metadata"]["name"] == name:
                return body
        raise type("ApiError", (Exception,), {"status": 404})()

    def delete_namespaced_custom_object(self, *args, **kwargs):
        pass


class LocalPods:
    def __init__(self, jobs: LocalJobApi):
        self.jobs = jobs

    def list_namespaced_pod(self, namespace, label_selector):
        code = getattr(self.jobs, "exit_code", None)
        statuses = [] if code is None else [{"state": {"terminated": {"exit_code": code}}}]
        return {"items": [{"metadata": {"name": "node-0"}, "status": {"container_statuses": statuses}}]}

    def read_namespaced_pod_log(self, name, namespace, follow, _preload_content):
        log = getattr(self.jobs, "log", "").encode()

        class Stream:
            def stream(self):
                yield log

        return Stream()


def test_trainjob_path_stages_data_runs_the_job_and_fetches_outputs(
    tiny_assets, s3_endpoint, tmp_path, monkeypatch
):
    monkeypatch.setenv("S3_ENDPOINT_URL", s3_endpoint.url)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", ACCESS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", SECRET_KEY)
    make_bucket(s3_endpoint.url, "mlpipeline")
    cfg = load_config(
        "configs/debug/tiny_cpu.yaml",
        [
            f"model.base={tiny_assets['model']}",
            "train.max_steps=3",
            "cluster.launcher=trainjob",
            "cluster.train_image=registry.example/sdtune-train:test",
            "cluster.namespace=team-a",
        ],
    )
    stage = tmp_path / "stage"
    ingest([str(tiny_assets["data"])], stage / "ingested", cfg.ingest)
    preprocess_dir(stage / "ingested", stage / "pre", cfg.preprocess)
    caption_dir(stage / "pre", stage / "captioned", cfg.caption)

    jobs = LocalJobApi()
    out = tmp_path / "out"
    code = steps._train_as_job(
        cfg,
        stage / "captioned",
        out,
        "",
        "run-abc",
        custom_api=jobs,
        core_api=LocalPods(jobs),
        poll_s=0.01,
        handle_signals=False,
    )
    assert code == 0, jobs.log[-2000:]
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert (out / "train_summary.json").is_file()
    body = jobs.bodies[0]
    assert body["kind"] == "TrainJob" and body["metadata"]["namespace"] == "team-a"
    assert body["spec"]["trainer"]["image"] == "registry.example/sdtune-train:test"
    staged = "s3://mlpipeline/private-artifacts/team-a/sdtune/staging/run-abc/data"
    assert staged in body["spec"]["trainer"]["args"]
    assert prefix_size(staged) == 0  # deleted once the outputs were safe
    requests = body["spec"]["trainer"]["resourcesPerNode"]["requests"]
    assert requests["ephemeral-storage"].endswith("Gi")  # sized from the staged dataset
