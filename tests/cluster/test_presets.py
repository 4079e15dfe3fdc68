"""Invariants over every preset in configs/: what a platform team's first run depends on, checked on the
compiled pipeline and the rendered jobs (nothing here needs a cluster)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from sdtune.cluster.jobs import render, spec_from_config
from sdtune.cluster.placement import (
    GPU_PRODUCT_LABEL,
    GPU_PRODUCTS,
    KFP_ALLOWED_PREFIXES,
    check_s3_prefixes,
    outside_allowed,
    s3_write_prefixes,
)
from sdtune.config import RunConfig, load_config
from sdtune.errors import ConfigError
from tests.cluster.conftest import ROOT, manifests_check
from tests.cluster.kubelet import container_env, expand

PRESETS = sorted((ROOT / "configs").rglob("*.yaml"))
IDS = [str(p.relative_to(ROOT / "configs")) for p in PRESETS]
OWNER = ("sdtune-run-train-launcher", "0d1f5c3e-7a2b-4c9d-8e6f-112233445566")
HARDWARE = re.compile(r"_(\d+)x([a-z0-9]+-\d+gb)$")  # full_8xa100-80gb → 8 GPUs of a100-80gb


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> dict[str, tuple[RunConfig, dict, dict]]:
    """preset → (config, pipeline spec, kubernetes platform executors), compiled by the real pipeline."""
    from pipelines.compile import compile_pipeline

    out = {}
    for path, name in zip(PRESETS, IDS, strict=True):
        cfg = load_config(path, [])
        target = tmp_path_factory.mktemp("compiled") / "p.yaml"
        docs = list(yaml.safe_load_all(compile_pipeline(cfg, target).read_text()))
        out[name] = (cfg, docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"])
    return out


def _task(spec: dict, platform: dict, task: str) -> tuple[dict, dict]:
    """(container, kubernetes settings) of the task named ``task`` (inside the exit handler)."""
    for component in spec["components"].values():
        for name, t in ((component.get("dag") or {}).get("tasks") or {}).items():
            if name == task:
                executor = spec["components"][t["componentRef"]["name"]]["executorLabel"]
                return spec["deploymentSpec"]["executors"][executor]["container"], platform[executor]
    raise KeyError(task)


def _job(cfg: RunConfig, kind: str, nodes: int = 2) -> dict:
    cfg = cfg.model_copy(deep=True)
    cfg.cluster.launcher, cfg.cluster.num_nodes = kind, nodes
    spec = spec_from_config(
        cfg,
        run_id="run-abc",
        attempt=0,
        image="img:1",
        args=["-m", "sdtune.remote_train", "--config-json", cfg.to_param()],
        namespace="team-a",
        owner=OWNER,
        ephemeral_storage="60Gi",
    )
    return render(kind, spec)


def _pods(job: dict) -> list[tuple[dict, dict]]:
    """(pod spec, training container) of each pod template, with TrainJob's trainer merged in."""
    if job["kind"] == "PyTorchJob":
        return [
            (r["template"]["spec"], r["template"]["spec"]["containers"][0])
            for r in job["spec"]["pytorchReplicaSpecs"].values()
        ]
    patch = job["spec"]["runtimePatches"][0]["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]
    pod = patch["template"]["spec"]["template"]["spec"]
    trainer = job["spec"]["trainer"]
    container = {**pod["containers"][0], "env": trainer["env"], "resources": trainer["resourcesPerNode"]}
    return [(pod, container)]


@pytest.mark.parametrize("preset", IDS)
def test_train_task_requests_the_gpus_its_ranks_use(compiled, preset):
    cfg, spec, platform = compiled[preset]
    container, k8s = _task(spec, platform, "train-op")
    accelerator = container["resources"].get("accelerator")
    gpus = int(accelerator["resourceCount"]) if accelerator else 0
    wanted = 0 if cfg.cluster.steps.train.gpus == 0 else cfg.train.num_processes
    assert gpus == wanted, f"{preset}: {cfg.train.num_processes} ranks on {gpus} GPU(s)"
    if gpus:
        assert any(t.get("key") == "nvidia.com/gpu" for t in k8s["tolerations"])
    # threads come from the pod's cgroup at run time (test below); a task env var would reach kfp.local too
    assert "OMP_NUM_THREADS" not in {e["name"] for e in container.get("env") or []}


@pytest.mark.parametrize("preset", IDS)
def test_named_hardware_is_what_the_pods_get(compiled, preset):
    cfg, spec, platform = compiled[preset]
    found = HARDWARE.search(Path(preset).stem)
    if found:
        assert cfg.train.num_processes == int(found[1]) and cfg.cluster.gpu_model == found[2]
    for task in ("train-op", "evaluate-op"):
        _, k8s = _task(spec, platform, task)
        if cfg.cluster.gpu_model:
            terms = [e for a in k8s["nodeAffinity"] for e in a["matchExpressions"]]
            assert terms == [
                {
                    "key": GPU_PRODUCT_LABEL,
                    "operator": "In",
                    "values": list(GPU_PRODUCTS[cfg.cluster.gpu_model]),
                }
            ]
        else:
            assert "nodeAffinity" not in k8s


def test_eight_gpu_presets_exist_and_get_eight_gpus(compiled):
    eight = [p for p in IDS if "8xa100" in p]
    assert len(eight) >= 3
    for preset in eight:
        cfg, spec, platform = compiled[preset]
        container, _ = _task(spec, platform, "train-op")
        assert container["resources"]["accelerator"]["resourceCount"] == "8"
        assert cfg.train.num_processes == 8


def _task_io(spec: dict, task: str) -> tuple[dict, dict]:
    """(inputDefinitions, outputDefinitions) of the component behind ``task``."""
    for component in spec["components"].values():
        for name, t in ((component.get("dag") or {}).get("tasks") or {}).items():
            if name == task:
                found = spec["components"][t["componentRef"]["name"]]
                return found.get("inputDefinitions") or {}, found.get("outputDefinitions") or {}
    raise KeyError(task)


def test_large_outputs_travel_by_uri_not_as_artifacts(compiled):
    """Full fine-tunes and DreamBooth (GB-size pipelines) hand evaluate and register an S3 URI string;
    adapters (MBs) still travel as a Model artifact. Either way the tasks keep their names."""
    seen = set()
    for preset, (cfg, spec, _) in compiled.items():
        by_uri = cfg.train.method in ("full", "dreambooth")
        seen.add(by_uri)
        _, train_out = _task_io(spec, "train-op")
        artifacts = train_out.get("artifacts") or {}
        if by_uri:
            assert artifacts == {}, f"{preset}: the train task still outputs {list(artifacts)}"
            assert train_out["parameters"]["model_uri"]["parameterType"] == "STRING", preset
        else:
            assert "model_uri" not in train_out.get("parameters", {}), preset
            assert artifacts["model"]["artifactType"]["schemaTitle"] == "system.Model", preset
        for task in ("evaluate-op", "register-op"):
            inputs, _ = _task_io(spec, task)
            assert ("model_uri" in inputs.get("parameters", {})) is by_uri, (preset, task)
            assert ("model" in inputs.get("artifacts", {})) is not by_uri, (preset, task)
    assert seen == {True, False}  # both kinds of preset exist


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
@pytest.mark.parametrize("preset", IDS)
def test_jobs_of_every_preset(compiled, crds, preset, kind):
    cfg = compiled[preset][0]
    job = _job(cfg, kind)
    assert manifests_check.validate_object(job, crds) == []
    assert manifests_check.policy_errors(job) == []
    # owned by the launcher pod: deleted with it even if the launcher never runs its cleanup
    (ref,) = job["metadata"]["ownerReferences"]
    assert (ref["kind"], ref["name"], ref["uid"]) == ("Pod", *OWNER)
    if kind == "pytorchjob":
        assert job["spec"]["runPolicy"]["cleanPodPolicy"] in ("Running", "All")
    grace = cfg.train.preempt_grace_s
    for pod, container in _pods(job):
        gpus = container["resources"]["limits"].get("nvidia.com/gpu", 0)
        assert gpus == (cfg.train.num_processes if cfg.cluster.steps.train.gpus else gpus)
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert float(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"]) >= grace
        assert pod["terminationGracePeriodSeconds"] > float(env["TORCH_ELASTIC_SHUTDOWN_TIMEOUT"])
        assert pod["serviceAccountName"] == cfg.cluster.job_service_account
        assert container["resources"]["requests"]["ephemeral-storage"] == "60Gi"
    if kind == "pytorchjob":
        workers = job["spec"]["pytorchReplicaSpecs"]
        assert workers["Master"]["template"]["spec"]["automountServiceAccountToken"] is False
        assert job["spec"]["nprocPerNode"] == str(cfg.train.num_processes)
    else:
        assert job["spec"]["trainer"]["numProcPerNode"] == cfg.train.num_processes


@pytest.mark.parametrize("preset", IDS)
def test_every_s3_write_falls_under_the_namespace_prefixes(compiled, preset):
    cfg = compiled[preset][0]
    check_s3_prefixes(cfg)  # as templates, before the namespace is known
    check_s3_prefixes(cfg, "team-a")
    for uri in s3_write_prefixes(cfg).values():
        assert not outside_allowed(uri, KFP_ALLOWED_PREFIXES, "team-a")
        assert "/team-a/" in uri.replace("{namespace}", "team-a")  # private to the namespace


def test_prefix_check_refuses_what_kfp_would_deny():
    old_default = RunConfig.model_validate({"cluster": {"staging_uri": "s3://mlpipeline/sdtune-staging"}})
    with pytest.raises(ConfigError, match="outside the namespace's writable S3 prefixes"):
        check_s3_prefixes(old_default, "team-a")
    other_ns = RunConfig.model_validate(
        {"cluster": {"staging_uri": "s3://mlpipeline/private-artifacts/team-b/x"}}
    )
    with pytest.raises(ConfigError):
        check_s3_prefixes(other_ns, "team-a")
    # `..` never gets as far as the prefix check: every s3:// reference with dot segments is refused on load.
    with pytest.raises(ValueError, match=r"\.\."):
        RunConfig.model_validate(
            {"cluster": {"staging_uri": "s3://mlpipeline/private-artifacts/team-a/../team-b/x"}}
        )
    own_bucket = RunConfig.model_validate(
        {"cluster": {"staging_uri": "s3://ml/stage", "allowed_s3_prefixes": ["s3://ml/"]}}
    )
    check_s3_prefixes(own_bucket, "team-a")  # configurable for stores other than KFP's
    from pipelines.compile import compile_pipeline

    with pytest.raises(ConfigError, match="cluster.staging_uri"):
        compile_pipeline(old_default, Path("/nonexistent/never-written.yaml"))
    named = RunConfig.model_validate({"cluster": {"namespace": "team-a"}})
    assert named.cluster.staging_uri == "s3://mlpipeline/private-artifacts/team-a/sdtune/staging"


@pytest.mark.parametrize("preset", IDS)
def test_no_preset_pins_a_checkpoint_path(preset):
    raw = yaml.safe_load((ROOT / "configs" / preset).read_text())
    # a fixed path is shared by every run of the preset: the next retrain resumes someone else's run
    assert (raw.get("train") or {}).get("checkpoint_dir") is None


def test_gpu_counts_that_disagree_with_the_ranks_are_refused():
    from sdtune.cluster.placement import gpus_per_node

    with pytest.raises(ConfigError, match="num_processes=8"):
        gpus_per_node(
            RunConfig.model_validate({"train": {"num_processes": 8}, "cluster": {"gpus_per_node": 1}})
        )
    with pytest.raises(ConfigError, match="steps.train.gpus=8"):
        gpus_per_node(RunConfig.model_validate({"cluster": {"steps": {"train": {"gpus": 8}}}}))
    # a config that went through to_param() (every field written out) is read the same way
    eight = RunConfig.model_validate({"train": {"num_processes": 8}})
    assert gpus_per_node(RunConfig.model_validate(yaml.safe_load(eight.to_param()))) == 8
    with pytest.raises(ConfigError, match="unknown GPU model"):
        load_config(None, ["cluster.gpu_model=a100"])


@pytest.mark.parametrize("kind", ["trainjob", "pytorchjob"])
def test_dollar_paren_in_the_config_stays_text(kind):
    """Kubernetes expands $(VAR) in args and env values: a prompt must not become the secret."""
    cfg = RunConfig.model_validate({"caption": {"template": "a $(AWS_SECRET_ACCESS_KEY) {trigger} $$ $x"}})
    job = _job(cfg, kind, nodes=1)
    for _, container in _pods(job):
        env = container_env(container, {"AWS_SECRET_ACCESS_KEY": "s3cr3t"})
        args = job["spec"]["trainer"]["args"] if kind == "trainjob" else container["args"]
        expanded = [expand(a, env) for a in args]
        assert "s3cr3t" not in json.dumps(expanded)
        config = expanded[expanded.index("--config-json") + 1]
        assert RunConfig.model_validate(yaml.safe_load(config)).caption.template == cfg.caption.template


@pytest.mark.parametrize("preset", IDS)
def test_only_gpu_steps_pull_the_cuda_image(compiled, preset):
    """register and the data steps run on CPU nodes: the slim image, not the multi-GB CUDA one."""
    from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE

    cfg, spec, platform = compiled[preset]
    for task in ("ingest-op", "caption-op", "register-op", "train-op", "evaluate-op"):
        container, _ = _task(spec, platform, task)
        gpu = "accelerator" in container["resources"]
        assert container["image"] == (SDTUNE_TRAIN_IMAGE if gpu or task == "train-op" else SDTUNE_IMAGE), task


def test_images_by_digest_when_recorded(tmp_path):
    import sdtune
    from components._images import image_ref
    from images.record_digest import record

    digests = tmp_path / "digests.json"
    assert image_ref("sdtune-train", digests) == f"ghcr.io/sdtune/sdtune-train:{sdtune.__version__}"
    metadata = tmp_path / "meta.json"
    metadata.write_text(json.dumps({"containerimage.digest": "sha256:" + "ab" * 32}))
    record("sdtune-train", metadata, digests)
    assert image_ref("sdtune-train", digests) == "ghcr.io/sdtune/sdtune-train@sha256:" + "ab" * 32
    assert image_ref("sdtune", digests).endswith(f":{sdtune.__version__}")  # only what was recorded
    stale = json.loads(digests.read_text())
    stale["sdtune-train"]["version"] = "0.0.0"  # recorded for another release: not used
    digests.write_text(json.dumps(stale))
    assert image_ref("sdtune-train", digests).endswith(f":{sdtune.__version__}")


def test_image_pull_secrets_reach_tasks_and_jobs(tmp_path):
    from pipelines.compile import compile_pipeline

    cfg = RunConfig.model_validate({"cluster": {"image_pull_secrets": ["regcred"]}})
    docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))
    executors = docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"].values()
    assert all([s["secretName"] for s in e["imagePullSecret"]] == ["regcred"] for e in executors)
    for kind in ("trainjob", "pytorchjob"):
        for pod, _ in _pods(_job(cfg, kind)):
            assert pod["imagePullSecrets"] == [{"name": "regcred"}]


def test_shared_cache_volume_holds_the_model_and_step_caches(tmp_path):
    """With cluster.cache_pvc the base model is fetched once per cluster and a retrain hits the step cache."""
    from pipelines.compile import compile_pipeline
    from sdtune.cluster.jobs import CACHE_ENV, CACHE_MOUNT

    cfg = RunConfig.model_validate({"cluster": {"cache_pvc": "sdtune-cache"}})
    docs = list(yaml.safe_load_all(compile_pipeline(cfg, tmp_path / "p.yaml").read_text()))
    spec, platform = docs[0], docs[1]["platforms"]["kubernetes"]["deploymentSpec"]["executors"]
    for task in ("caption-op", "train-op", "evaluate-op"):
        container, k8s = _task(spec, platform, task)
        assert [(m["constant"], m["mountPath"]) for m in k8s["pvcMount"]] == [("sdtune-cache", CACHE_MOUNT)]
        env = {e["name"]: e["value"] for e in container["env"]}
        assert {k: env[k] for k in CACHE_ENV} == CACHE_ENV
    for kind in ("trainjob", "pytorchjob"):
        for pod, container in _pods(_job(cfg, kind)):
            assert {"name": "sdtune-cache", "persistentVolumeClaim": {"claimName": "sdtune-cache"}} in pod[
                "volumes"
            ]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["HF_HOME"] == CACHE_ENV["HF_HOME"]
    _, k8s = _task(spec, platform, "register-op")
    assert "pvcMount" not in k8s


@pytest.mark.parametrize(
    ("files", "ranks", "expected"),
    [
        ({"cpu.max": "1600000 100000\n"}, 8, "2"),  # cgroup v2: 16 cores, 8 ranks
        ({"cpu.max": "max 100000\n"}, 1, None),  # unlimited: leave torch's default
        ({"cpu/cpu.cfs_quota_us": "400000", "cpu/cpu.cfs_period_us": "100000"}, 1, "4"),  # cgroup v1
        ({"cpu.max": "50000 100000\n"}, 1, "1"),  # half a core: still one thread
    ],
)
def test_threads_follow_the_pod_cpu_limit(tmp_path, monkeypatch, files, ranks, expected):
    from sdtune.cluster.placement import use_pod_cpu_limit

    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    use_pod_cpu_limit(ranks, tmp_path)
    import os

    assert os.environ.get("OMP_NUM_THREADS") == expected
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit choice wins
    use_pod_cpu_limit(ranks, tmp_path)
    assert os.environ["OMP_NUM_THREADS"] == "3"
