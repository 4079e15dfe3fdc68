"""The compiled pipeline: the task graph, the images, and the config default it carries."""

import yaml

from components._images import SDTUNE_IMAGE, SDTUNE_TRAIN_IMAGE
from pipelines.compile import compile_pipeline
from sdtune.config import RunConfig, config_from_yaml


def _compile(tmp_path, cfg=None):
    path = compile_pipeline(cfg or RunConfig(name="compiled"), tmp_path / "p.yaml")
    return list(yaml.safe_load_all(path.read_text()))[0]


def test_task_graph_in_order(tmp_path):
    spec = _compile(tmp_path)
    inner = spec["components"]["comp-exit-handler-1"]["dag"]["tasks"]
    deps = {name: set(task.get("dependentTasks", [])) for name, task in inner.items()}
    assert deps["ingest-op"] == {"start-run-op"}
    fan_out = next(name for name in inner if name.startswith("for-loop"))
    assert deps[fan_out] >= {"ingest-op"}
    assert "preprocess-op" in spec["components"][f"comp-{fan_out}"]["dag"]["tasks"]
    assert inner[fan_out]["parameterIterator"]["items"]["inputParameter"].endswith("ingest-op-Output")
    assert inner[fan_out]["iteratorPolicy"]["parallelismLimit"] == RunConfig().preprocess.parallel_shards
    assert deps["merge-op"] >= {fan_out}
    assert deps["caption-op"] >= {"merge-op"}
    assert deps["train-op"] >= {"caption-op"}
    assert deps["evaluate-op"] >= {"train-op", "caption-op"}
    assert deps["register-op"] >= {"train-op", "evaluate-op"}
    root = spec["root"]["dag"]["tasks"]
    assert root["finish-run-op"]["triggerPolicy"]["strategy"] == "ALL_UPSTREAM_TASKS_COMPLETED"


def test_images_follow_the_package_version(tmp_path):
    spec = _compile(tmp_path)
    images = {name: ex["container"]["image"] for name, ex in spec["deploymentSpec"]["executors"].items()}
    assert images["exec-train-op"] == SDTUNE_TRAIN_IMAGE
    assert images["exec-ingest-op"] == SDTUNE_IMAGE
    for executor in spec["deploymentSpec"]["executors"].values():
        # install_kfp_package=False: nothing is pip-installed when a task starts
        assert "pip install" not in " ".join(executor["container"].get("command", []))


def test_config_travels_as_the_default_parameter(tmp_path):
    cfg = RunConfig(name="carried")
    spec = _compile(tmp_path, cfg)
    default = spec["root"]["inputDefinitions"]["parameters"]["config"]["defaultValue"]
    assert config_from_yaml(default) == cfg
