"""The Katib engine: the rendered Experiment validates against Katib's v1beta1 API schema (strict), its trial
template against the Job / TrainJob schemas; submit and follow against a fake CustomObjectsApi."""

from __future__ import annotations

import copy
import io
import json
import re
import shlex
import subprocess
import sys

import jsonschema
import pytest

from sdtune.cli.sweep import sweep_config
from sdtune.config import RunConfig, load_config
from sdtune.errors import ConfigError
from sdtune.sweep import katib
from sdtune.sweep.trial import print_metrics
from tests.cluster.conftest import ROOT, manifests_check
from tests.cluster.kubelet import container_env, expand

# Katib's StdOut metrics collector default filter (pkg/metricscollector/v1beta1/common: DefaultFilter).
KATIB_FILTER = r"([\w|-]+)\s*=\s*([+-]?\d*(\.\d+)?([Ee][+-]?\d+)?)"


@pytest.fixture(scope="module")
def experiment_validator(schemas):
    swagger = json.loads((schemas / "katib" / "swagger.json").read_text())
    components = manifests_check._strict(swagger["components"])
    root = {"$ref": "#/components/schemas/v1beta1.Experiment", "components": components}
    return jsonschema.Draft7Validator(root)


def _errors(validator, obj) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(obj)]


def _cfg(tmp_path, **settings) -> RunConfig:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of {trigger} {class_noun}\n{trigger} {class_noun}, studio light\n")
    base = RunConfig.model_validate({"name": "robot", "ingest": {"sources": ["s3://bucket/robot"]}})
    return sweep_config(base, prompts=prompts, max_failed=1, parallelism=2, **settings)


def _placeholders(obj) -> set[str]:
    return set(re.findall(r"\$\{trialParameters\.([^}]+)\}", json.dumps(obj)))


def test_grid_experiment_validates(tmp_path, experiment_validator):
    cfg = _cfg(tmp_path, grid=["train.learning_rate=1e-4,5e-5", "train.rank=4,16"])
    exp = katib.render_experiment(cfg, "sweep-robot-1", "ghcr.io/sdtune/sdtune-train:1", "team-a")
    assert _errors(experiment_validator, exp) == []
    spec = exp["spec"]
    assert spec["objective"] == {"type": "minimize", "objectiveMetricName": "loss_tuned_trigger"}
    assert spec["algorithm"] == {"algorithmName": "grid"}
    assert (spec["parallelTrialCount"], spec["maxTrialCount"], spec["maxFailedTrialCount"]) == (2, 8, 1)
    params = {p["name"]: p for p in spec["parameters"]}
    assert params["train_learning_rate"] == {
        "name": "train_learning_rate",
        "parameterType": "discrete",
        "feasibleSpace": {"list": ["0.0001", "5e-05"]},
    }
    assert params["caption_template"]["parameterType"] == "categorical"
    # every placeholder is a declared trial parameter, and every parameter is used
    template = spec["trialTemplate"]
    declared = {p["name"] for p in template["trialParameters"]}
    assert _placeholders(template["trialSpec"]) == declared == {*params, katib.TRIAL_NAME_PARAM}
    assert {p["reference"] for p in template["trialParameters"]} == {*params, "${trialSpec.Name}"}
    container = template["trialSpec"]["spec"]["template"]["spec"]["containers"][0]
    assert container["name"] == template["primaryContainerName"]
    assert container["command"] == ["python", "-m", "sdtune.sweep.katib"]
    args = container["args"]
    assert args[args.index("train.learning_rate") - 1] == "--value"
    assert args[args.index("caption.template") - 1] == "--text"
    env = {e["name"]: e for e in container["env"]}
    assert env["SDTUNE_TRIAL_train_learning_rate"]["value"] == "${trialParameters.train_learning_rate}"
    assert RunConfig.model_validate_json(env["SDTUNE_CONFIG"]["value"]).sweep.max_failed == 1
    assert env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "mlpipeline-minio-artifact"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_random_bayesian_tpe_experiments_validate(tmp_path, experiment_validator):
    for algorithm in ("random", "bayesianoptimization", "tpe"):
        cfg = _cfg(
            tmp_path,
            grid=[
                "train.learning_rate=loguniform:1e-5:1e-3",
                "train.rank=int:2:16",
                "train.lr_scheduler=constant,cosine",
            ],
            random_trials=6,
            algorithm=algorithm,
            direction="maximize",
            metric="clip_i",
        )
        exp = katib.render_experiment(cfg, "sweep-robot-2", "img:1", "team-a")
        assert _errors(experiment_validator, exp) == []
        spec = exp["spec"]
        assert spec["algorithm"] == {
            "algorithmName": algorithm,
            "algorithmSettings": [{"name": "random_state", "value": "0"}],
        }
        assert spec["maxTrialCount"] == 6 and spec["objective"]["type"] == "maximize"
        params = {p["name"]: p for p in spec["parameters"]}
        assert params["train_learning_rate"] == {
            "name": "train_learning_rate",
            "parameterType": "double",
            "feasibleSpace": {"min": "1e-05", "max": "0.001", "distribution": "logUniform"},
        }
        assert params["train_rank"]["feasibleSpace"] == {"min": "2", "max": "16"}
        assert params["train_lr_scheduler"]["parameterType"] == "categorical"


def test_schema_catches_mistakes(tmp_path, experiment_validator):
    exp = katib.render_experiment(_cfg(tmp_path, grid=["train.rank=4,8"]), "sweep-x", "img:1", "ns")
    bad = copy.deepcopy(exp)
    bad["spec"]["maxTrialCount"] = "4"
    assert any("not of type 'integer'" in e for e in _errors(experiment_validator, bad))
    bad = copy.deepcopy(exp)
    bad["spec"]["parallelTrials"] = 2
    assert any("parallelTrials" in e for e in _errors(experiment_validator, bad))


def test_trial_job_and_trainjob_validate(tmp_path, crds):
    cfg = _cfg(tmp_path, grid=["train.rank=4,8"])
    job = katib.render_experiment(cfg, "sweep-x", "img:1", "ns")["spec"]["trialTemplate"]["trialSpec"]
    job = {**job, "metadata": {"name": "sweep-x-abc", "namespace": "ns"}}  # Katib sets these
    assert manifests_check.validate_object(job, crds) == []
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never" and pod["securityContext"]["runAsNonRoot"] is True
    assert job["spec"]["template"]["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert manifests_check.policy_errors(job) == []  # no escalation, no capabilities, RuntimeDefault seccomp
    # trials never call the API: an account without bindings, and no token in the pod
    assert pod["serviceAccountName"] == "sdtune-training" and pod["automountServiceAccountToken"] is False

    multi = cfg.model_copy(deep=True)
    multi.cluster.launcher = "trainjob"
    multi.cluster.gpus_per_node = 4
    multi.train.num_processes = 4
    exp = katib.render_experiment(multi, "sweep-x", "img:1", "ns")
    template = exp["spec"]["trialTemplate"]
    trainjob = {**template["trialSpec"], "metadata": {"name": "sweep-x-abc", "namespace": "ns"}}
    assert trainjob["kind"] == "TrainJob"
    assert manifests_check.validate_object(trainjob, crds) == []
    trainer = trainjob["spec"]["trainer"]
    assert trainer["numNodes"] == 1 and trainer["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == 4
    assert trainer["command"] == ["python", "-m", "sdtune.sweep.katib"]
    assert template["primaryContainerName"] == "node" and "Complete" in template["successCondition"]


def test_grid_with_ranges_and_bad_ids_are_refused(tmp_path):
    cfg = _cfg(tmp_path, grid=["train.learning_rate=loguniform:1e-5:1e-3"])
    with pytest.raises(ConfigError, match="grid search cannot sample ranges"):
        katib.render_experiment(cfg, "sweep-x", "img", "ns")
    with pytest.raises(ConfigError, match="DNS label"):
        katib.render_experiment(_cfg(tmp_path, grid=["train.rank=4,8"]), "Sweep_X", "img", "ns")


def test_metrics_are_printed_in_the_stdout_collector_format():
    out = io.StringIO()
    print_metrics({"loss_tuned_trigger": 0.123456789, "loss_delta_trigger": -1.5e-05}, out)
    found = dict((m[0], float(m[1])) for m in re.findall(KATIB_FILTER, out.getvalue()))
    assert found == {"loss_delta_trigger": -1.5e-05, "loss_tuned_trigger": 0.12345679}


class ApiError(Exception):
    def __init__(self, status):
        super().__init__(status)
        self.status = status


class FakeCustom:
    def __init__(self, states):
        self.objects, self.states, self.gets = {}, list(states), 0

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        assert (group, version, plural) == ("kubeflow.org", "v1beta1", "experiments")
        name = body["metadata"]["name"]
        if name in self.objects:
            raise ApiError(409)
        self.objects[name] = copy.deepcopy(body)
        return body

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.gets += 1
        obj = self.objects[name]
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        obj["status"] = state
        return obj


def _status(running, ok, failed, done=None):
    status = {
        "trials": running + ok + failed,
        "trialsRunning": running,
        "trialsSucceeded": ok,
        "trialsFailed": failed,
    }
    if done:
        status["conditions"] = [
            {"type": "Running", "status": "False"},
            {"type": done, "status": "True", "message": f"Experiment {done.lower()}"},
        ]
        status["currentOptimalTrial"] = {
            "bestTrialName": "sweep-x-abc",
            "parameterAssignments": [{"name": "train_rank", "value": "8"}],
            "observation": {"metrics": [{"name": "loss_tuned_trigger", "latest": "0.91", "min": "0.91"}]},
        }
    return status


def test_submit_and_follow(tmp_path):
    exp = katib.render_experiment(_cfg(tmp_path, grid=["train.rank=4,8"]), "sweep-x", "img", "ns")
    api = FakeCustom([_status(2, 0, 0), _status(2, 0, 0), _status(1, 1, 0), _status(0, 1, 1, "Succeeded")])
    katib.submit_experiment(exp, api)
    katib.submit_experiment(exp, api)  # again: attaches to the existing one (409)
    out = io.StringIO()
    final = katib.follow_experiment("sweep-x", "ns", custom_api=api, poll_s=0, out=out, sleep=lambda s: None)
    assert katib.optimal_trial(final) == {
        "trial": "sweep-x-abc",
        "parameters": {"train_rank": "8"},
        "metrics": {"loss_tuned_trigger": "0.91"},
    }
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "1 succeeded, 1 failed" in lines[-1]  # printed only when counts change

    api = FakeCustom([_status(0, 0, 2, "Failed")])
    katib.submit_experiment(exp, api)
    with pytest.raises(katib.KatibError, match="failed: Experiment failed"):
        katib.follow_experiment(
            "sweep-x", "ns", custom_api=api, poll_s=0, out=io.StringIO(), sleep=lambda s: None
        )

    api = FakeCustom([_status(1, 0, 0)])
    katib.submit_experiment(exp, api)
    ticks = iter(range(100))
    with pytest.raises(katib.KatibError, match="still running"):
        katib.follow_experiment(
            "sweep-x",
            "ns",
            custom_api=api,
            poll_s=0,
            timeout_s=3,
            out=io.StringIO(),
            sleep=lambda s: None,
            clock=lambda: next(ticks),
        )


# Katib's StdOut collector (pkg/webhook/v1beta1/pod/inject_webhook.go) replaces the primary container's
# command with `sh -c "<command and args joined by spaces> 1>/var/log/katib/metrics.log 2>&1 && …"`.
PROMPTS = [
    "a photo of {trigger} {class_noun}",
    "{trigger}'s {class_noun} at $HOME, `uname` & ; | > out (1)",
    "cost $(AWS_SECRET_ACCESS_KEY) * ?",
]


def _katib_substitute(trial_spec: dict, values: dict[str, str]) -> dict:
    """What Katib does: the placeholders replaced in the spec's JSON text, then parsed again."""
    text = json.dumps(trial_spec)
    for name, value in values.items():
        text = text.replace(f"${{trialParameters.{name}}}", value)
    return json.loads(text)


PRESETS = sorted(str(p.relative_to(ROOT / "configs")) for p in (ROOT / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_trial_command_survives_the_stdout_collector_shell(tmp_path, preset):
    """Every preset, swept over prompts with spaces, quotes, `$`, backticks: the trial gets them verbatim
    (each preset runs one of the prompts through a real `sh -c`, in turn; every arg is a plain word)."""
    path = ROOT / "configs" / preset
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    cfg = sweep_config(
        load_config(path, []), prompts=prompts, grid=["train.learning_rate=1e-4,5e-5"], parallelism=2
    )
    exp = katib.render_experiment(cfg, "sweep-q", "img:1", "team-a")
    params = {p["name"]: p["feasibleSpace"]["list"] for p in exp["spec"]["parameters"]}
    template = exp["spec"]["trialTemplate"]
    assert exp["spec"]["maxFailedTrialCount"] >= 1  # one failed trial does not end the sweep
    index = PRESETS.index(preset) % len(PROMPTS)
    for prompt in [PROMPTS[index]]:
        chosen = {"trialName": f"sweep-q-{index}", "train_learning_rate": params["train_learning_rate"][1]}
        chosen["caption_template"] = params["caption_template"][index]
        spec = _katib_substitute(template["trialSpec"], chosen)
        if spec["kind"] == "TrainJob":
            container = {**spec["spec"]["trainer"]}
        else:
            container = spec["spec"]["template"]["spec"]["containers"][0]
        env = {**container_env(container, {"AWS_SECRET_ACCESS_KEY": "s3cr3t"}), "PYTHONPATH": str(ROOT)}
        words = [expand(w, env) for w in [*container["command"], *container["args"]]]
        assert words[0] == "python" and all(katib.SHELL_SAFE.match(w) for w in words)
        line = " ".join([shlex.quote(sys.executable), *words[1:], "--print-argv"])  # joined, unquoted
        done = subprocess.run(["sh", "-c", line], env=env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        argv = json.loads(done.stdout)
        assert argv[argv.index("--text") + 1] == f"caption.template={prompt}"
        assert (
            "train.learning_rate=5e-05" in argv and argv[argv.index("--trial-name") + 1] == f"sweep-q-{index}"
        )
        assert "s3cr3t" not in done.stdout
        trial_cfg = RunConfig.model_validate_json(env["SDTUNE_CONFIG"])
        assert trial_cfg.sweep.prompts == PROMPTS


def test_values_katib_cannot_carry_are_refused(tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('a "quoted" {trigger}\nplain {trigger}\n')
    cfg = sweep_config(RunConfig(), prompts=prompts)
    with pytest.raises(ConfigError, match="double quote"):
        katib.render_experiment(cfg, "sweep-q", "img:1", "team-a")
