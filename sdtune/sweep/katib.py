"""A sweep as a Katib ``Experiment`` (kubeflow.org/v1beta1): render it, submit it, follow it.

* objective: ``sweep.metric`` in ``sweep.direction``;
* algorithm: ``sweep.algorithm`` (grid, random, bayesianoptimization, tpe; ``random_state`` = ``sweep.seed``);
* parameters: each ``sweep.grid`` list (``discrete`` when all numbers, else ``categorical``), each range
  (``uniform`` → double, ``loguniform`` → double with ``logUniform``, ``int`` → int), the prompt variants
  (``categorical``);
* trials: a batch ``Job`` (or, with ``cluster.launcher=trainjob``, a one-node ``TrainJob`` for multi-GPU
  trials) running ``python -m sdtune.sweep.katib`` (→ ``sdtune sweeps trial``): data stages
  (content-cached), train, evaluate, then ``name=value`` lines on stdout, which Katib's ``StdOut`` metrics
  collector reads. The trial's config travels in the ``SDTUNE_CONFIG`` env var (one line of JSON), each
  trial value in an env var of its own (``SDTUNE_TRIAL_<param>`` = ``${trialParameters.<param>}``).

Why env vars: the StdOut collector rewrites the container command into ``sh -c "<command and args joined by
spaces>"`` without quoting, so a prompt in the args would be split into words (and ``$``/backticks
expanded). The args hold only shell-safe tokens; values reach the trial untouched through the environment.
Katib substitutes the values into the trial spec's JSON text, so a value may not hold a double quote, a backslash or a
newline (refused up front); ``$`` is written ``$$`` (Kubernetes' ``$(VAR)`` expansion of env values).

``maxFailedTrialCount``: ``sweep.max_failed`` when above 0, else (the default 0) a quarter of the trials, at
least 1: Katib fails the whole experiment, running trials included, as soon as more trials than that fail,
and one flaky node should not end a sweep.
The kubernetes client is imported lazily; tests pass a fake ``CustomObjectsApi``.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

from sdtune.cluster.jobs import (
    GPU_RESOURCE,
    JobSpec,
    label_value,
    render_pytorchjob,
    render_trainjob,
    spec_from_config,
)
from sdtune.config import RunConfig
from sdtune.errors import ConfigError, SdtuneError
from sdtune.sweep.space import Range, dimensions

GROUP, VERSION, PLURAL = "kubeflow.org", "v1beta1", "experiments"
API_VERSION = f"{GROUP}/{VERSION}"
CONTAINER = "sdtune-trial"
CONFIG_ENV = "SDTUNE_CONFIG"
SWEEP_LABEL = "sdtune.io/sweep-id"
TRIAL_NAME_PARAM = "trialName"
TRIAL_COMMAND = ["python", "-m", "sdtune.sweep.katib"]
TRIAL_WORKDIR = "/tmp/sdtune-trial"
TRIAL_ENV_PREFIX = "SDTUNE_TRIAL_"
TRIAL_NAME_ENV = "SDTUNE_TRIAL_NAME"
# What a Katib-substituted value may not contain (it is spliced into the trial spec's JSON text).
UNSAFE_IN_TEMPLATE = re.compile(r'["\\\n\r]')
SHELL_SAFE = re.compile(r"^[A-Za-z0-9_./=:,+-]+$")


class KatibError(SdtuneError):
    exit_code = 4


def param_name(key: str) -> str:
    """``train.learning_rate`` → ``train_learning_rate`` (a Katib parameter / trialParameter name)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", key)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _as_text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _katib_value(key: str, value: Any) -> str:
    """A feasible value as Katib will splice it into the trial spec (see the module doc)."""
    text = _as_text(value)
    if UNSAFE_IN_TEMPLATE.search(text):
        raise ConfigError(
            f"sweep value {text!r} of {key}: Katib cannot pass a double quote, backslash or line break; "
            "use the kfp sweep engine for it"
        )
    return text.replace("$", "$$")


def trial_env_name(key: str) -> str:
    return TRIAL_ENV_PREFIX + param_name(key)


def parameters(cfg: RunConfig) -> list[dict[str, Any]]:
    """Katib ParameterSpecs for the sweep's lists, prompt variants and ranges."""
    lists, ranges = dimensions(cfg.sweep)
    out: list[dict[str, Any]] = []
    for key, values in lists.items():
        texts = [_katib_value(key, v) for v in values]
        if len(set(texts)) != len(texts):
            raise ConfigError(f"sweep values of {key} repeat: {texts}")
        kind = "discrete" if all(_is_number(v) for v in values) else "categorical"
        out.append({"name": param_name(key), "parameterType": kind, "feasibleSpace": {"list": texts}})
    for key, rng in ranges.items():
        out.append({"name": param_name(key), **_range_spec(rng)})
    return out


def _range_spec(rng: Range) -> dict[str, Any]:
    if rng.kind == "int":
        return {
            "parameterType": "int",
            "feasibleSpace": {"min": str(int(rng.low)), "max": str(int(rng.high))},
        }
    space = {"min": repr(rng.low), "max": repr(rng.high)}
    space["distribution"] = "logUniform" if rng.kind == "loguniform" else "uniform"
    return {"parameterType": "double", "feasibleSpace": space}


def max_trials(cfg: RunConfig) -> int:
    sw = cfg.sweep
    if sw.algorithm == "grid":
        lists, ranges = dimensions(sw)
        if ranges:
            raise ConfigError(
                "grid search cannot sample ranges: use sweep.algorithm random/bayesianoptimization/tpe"
            )
        count = 1
        for values in lists.values():
            count *= len(values)
        return count
    if not sw.max_trials:
        raise ConfigError(f"sweep.algorithm={sw.algorithm} needs sweep.max_trials (--random N)")
    return sw.max_trials


def trial_args(cfg: RunConfig, sweep_id: str) -> list[str]:
    """The trial entry's arguments: names only (every one shell-safe), the values come from env vars."""
    lists, ranges = dimensions(cfg.sweep)
    args = ["--sweep-id", sweep_id, "--workdir", TRIAL_WORKDIR]
    for key in [*lists, *ranges]:
        # Prompt variants are free text: passed verbatim, never parsed as YAML.
        verbatim = key == cfg.sweep.prompt_key and cfg.sweep.prompts
        args += ["--text" if verbatim else "--value", key]
    unsafe = [a for a in args if not SHELL_SAFE.match(a)]
    if unsafe:
        raise ConfigError(f"sweep key or id {unsafe[0]!r} is not a plain name (letters, digits, . _ -)")
    return args


def trial_env(cfg: RunConfig) -> list[dict[str, str]]:
    """One env var per trial value, holding Katib's ``${trialParameters.…}`` placeholder."""
    lists, ranges = dimensions(cfg.sweep)
    env = [{"name": TRIAL_NAME_ENV, "value": f"${{trialParameters.{TRIAL_NAME_PARAM}}}"}]
    for key in [*lists, *ranges]:
        env.append({"name": trial_env_name(key), "value": f"${{trialParameters.{param_name(key)}}}"})
    return env


def max_failed(cfg: RunConfig) -> int:
    """``sweep.max_failed`` when above 0, else a quarter of the trials (at least one); see the module doc."""
    return cfg.sweep.max_failed or max(1, max_trials(cfg) // 4)


def trial_argv(argv: list[str], environ: dict[str, str]) -> list[str]:
    """The ``sdtune sweeps trial`` argv for the trial entry's ``argv`` and environment."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m sdtune.sweep.katib")
    parser.add_argument("--sweep-id", required=True)
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--value", action="append", default=[])
    parser.add_argument("--text", action="append", default=[])
    parser.add_argument("--print-argv", action="store_true", help="print the argv as JSON and stop")
    args = parser.parse_args(argv)

    def value(key: str) -> str:
        name = trial_env_name(key)
        if name not in environ:
            raise ConfigError(f"trial value {key}: env var {name} is not set")
        return environ[name]

    out = ["sweeps", "trial", "--sweep-id", args.sweep_id, "--workdir", args.workdir]
    out += ["--trial-name", environ.get(TRIAL_NAME_ENV, "trial")]
    out += [f"{key}={value(key)}" for key in args.value]
    for key in args.text:
        out += ["--text", f"{key}={value(key)}"]
    return out


def _job_spec(cfg: RunConfig, sweep_id: str, image: str, namespace: str) -> JobSpec:
    spec = spec_from_config(
        cfg, run_id=sweep_id, attempt=0, image=image, args=trial_args(cfg, sweep_id), namespace=namespace
    )
    from dataclasses import replace

    from sdtune.cluster.placement import gpus_per_node

    gpus = gpus_per_node(cfg)

    return replace(
        spec,
        num_nodes=1,
        gpus_per_node=gpus,
        env=[
            {"name": CONFIG_ENV, "value": cfg.storable(refuse=True).to_param()},
            {"name": "PYTHONUNBUFFERED", "value": "1"},
        ],
        node_selector=dict(cfg.cluster.node_selector, **(cfg.cluster.gpu_node_selector if gpus else {})),
        tolerations=[
            t.model_dump(exclude_none=True)
            for t in [*cfg.cluster.tolerations, *(cfg.cluster.gpu_tolerations if gpus else [])]
        ],
    )


def trial_job(cfg: RunConfig, sweep_id: str, image: str, namespace: str) -> dict[str, Any]:
    """A batch/v1 Job running one trial in one pod (the train step's resources)."""
    spec = _job_spec(cfg, sweep_id, image, namespace)
    template = render_pytorchjob(spec)["spec"]["pytorchReplicaSpecs"]["Master"]["template"]
    container = template["spec"]["containers"][0]
    container.update(name=CONTAINER, command=list(TRIAL_COMMAND), args=list(spec.args))
    container["env"] = [*trial_env(cfg), *container["env"]]
    if not spec.gpus_per_node:
        for part in ("requests", "limits"):
            container["resources"][part].pop(GPU_RESOURCE, None)
    template["spec"]["restartPolicy"] = "Never"
    # The trial never calls the Kubernetes API: the job account (no bindings), no token mounted.
    job_spec: dict[str, Any] = {"backoffLimit": 0, "template": template}
    if cfg.cluster.job_timeout_s:
        job_spec["activeDeadlineSeconds"] = cfg.cluster.job_timeout_s
    return {"apiVersion": "batch/v1", "kind": "Job", "spec": job_spec}


def trial_trainjob(cfg: RunConfig, sweep_id: str, image: str, namespace: str) -> dict[str, Any]:
    """A one-node TrainJob running one trial with ``cluster.gpus_per_node`` GPUs (torchrun inside the trial)."""
    spec = _job_spec(cfg, sweep_id, image, namespace)
    job = render_trainjob(spec)
    job.pop("metadata", None)  # Katib names the trial's resource
    trainer = job["spec"]["trainer"]
    trainer.update(command=list(TRIAL_COMMAND), args=list(spec.args), numNodes=1)
    trainer["env"] = [*trial_env(cfg), *trainer["env"]]
    return job


def render_experiment(cfg: RunConfig, sweep_id: str, image: str, namespace: str) -> dict[str, Any]:
    """The Experiment for ``cfg.sweep`` (see the module doc)."""
    sw = cfg.sweep
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", sweep_id) or len(sweep_id) > 40:
        raise ConfigError(f"sweep id {sweep_id!r} must be a lowercase DNS label of at most 40 characters")
    params = parameters(cfg)
    if not params:
        raise ConfigError("nothing to sweep: give sweep.grid, sweep.ranges or sweep.prompts")
    trainjob = cfg.cluster.launcher == "trainjob"
    trial_spec = (
        trial_trainjob(cfg, sweep_id, image, namespace)
        if trainjob
        else trial_job(cfg, sweep_id, image, namespace)
    )
    trial_params = [
        {"name": TRIAL_NAME_PARAM, "description": "the trial's name", "reference": "${trialSpec.Name}"}
    ]
    trial_params += [{"name": p["name"], "description": p["name"], "reference": p["name"]} for p in params]
    template: dict[str, Any] = {
        "primaryContainerName": "node" if trainjob else CONTAINER,
        "retain": True,  # keep finished trial pods: their logs explain failures
        "trialParameters": trial_params,
        "trialSpec": trial_spec,
    }
    if trainjob:
        template["primaryPodLabels"] = {
            "jobset.sigs.k8s.io/replicatedjob-name": "node",
            "batch.kubernetes.io/job-completion-index": "0",
        }
        template["successCondition"] = 'status.conditions.#(type=="Complete")#|#(status=="True")#'
        template["failureCondition"] = 'status.conditions.#(type=="Failed")#|#(status=="True")#'
    algorithm: dict[str, Any] = {"algorithmName": sw.algorithm}
    if sw.algorithm != "grid":
        algorithm["algorithmSettings"] = [{"name": "random_state", "value": str(sw.seed)}]
    return {
        "apiVersion": API_VERSION,
        "kind": "Experiment",
        "metadata": {
            "name": sweep_id,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "sdtune", SWEEP_LABEL: label_value(sweep_id)},
        },
        "spec": {
            "objective": {"type": sw.direction, "objectiveMetricName": sw.metric},
            "algorithm": algorithm,
            "parallelTrialCount": sw.parallelism,
            "maxTrialCount": max_trials(cfg),
            "maxFailedTrialCount": max_failed(cfg),
            "metricsCollectorSpec": {"collector": {"kind": "StdOut"}},
            "parameters": params,
            "trialTemplate": template,
        },
    }


# --- submit and follow ------------------------------------------------------------------------------------


def _default_api() -> Any:
    try:
        from kubernetes import client, config
    except ImportError:  # pragma: no cover - the [kfp] extra brings it
        raise KatibError(
            "the kubernetes package is needed for --engine katib (pip install kubernetes)"
        ) from None
    try:
        config.load_incluster_config()
    except Exception:
        try:
            config.load_kube_config()
        except Exception as exc:
            raise KatibError(f"no Kubernetes credentials (in-cluster or kubeconfig): {exc}") from None
    return client.CustomObjectsApi()


def submit_experiment(experiment: dict[str, Any], custom_api: Any = None) -> dict[str, Any]:
    """Create the Experiment; an existing one of the same name is returned (re-running follows it)."""
    api = custom_api or _default_api()
    meta = experiment["metadata"]
    try:
        return api.create_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, experiment)
    except Exception as exc:
        if getattr(exc, "status", None) == 409:
            return api.get_namespaced_custom_object(GROUP, VERSION, meta["namespace"], PLURAL, meta["name"])
        if getattr(exc, "status", None) in (401, 403):
            raise KatibError(
                f"not allowed to create Katib experiments in {meta['namespace']}: {exc}"
            ) from None
        if getattr(exc, "status", None) == 404:
            raise KatibError("the Katib Experiment API is not installed on this cluster (404)") from None
        raise


def experiment_state(obj: dict[str, Any]) -> tuple[str, str]:
    """(Succeeded|Failed|Running, message) from the Experiment's conditions."""
    for cond in reversed((obj.get("status") or {}).get("conditions") or []):
        if cond.get("status") == "True" and cond.get("type") in ("Succeeded", "Failed"):
            return cond["type"], cond.get("message", "")
    return "Running", ""


def optimal_trial(obj: dict[str, Any]) -> dict[str, Any]:
    """The best trial Katib has seen: name, parameter values and objective metric values."""
    best = (obj.get("status") or {}).get("currentOptimalTrial") or {}
    params = {p.get("name"): p.get("value") for p in best.get("parameterAssignments") or []}
    metrics = {m.get("name"): m.get("latest") for m in (best.get("observation") or {}).get("metrics") or []}
    return {"trial": best.get("bestTrialName", ""), "parameters": params, "metrics": metrics}


def follow_experiment(
    name: str,
    namespace: str,
    *,
    custom_api: Any = None,
    poll_s: float = 30.0,
    timeout_s: float = 7 * 24 * 3600,
    out: TextIO | None = None,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, Any]:
    """Poll until the Experiment succeeds or fails, printing trial counts when they change."""
    api = custom_api or _default_api()
    out = out or sys.stdout
    deadline = clock() + timeout_s
    last = None
    while True:
        obj = api.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, name)
        status = obj.get("status") or {}
        counts = tuple(
            status.get(k, 0) for k in ("trials", "trialsRunning", "trialsSucceeded", "trialsFailed")
        )
        if counts != last:
            out.write(
                f"[sdtune] {name}: {counts[0]} trials, {counts[1]} running, {counts[2]} succeeded, "
                f"{counts[3]} failed\n"
            )
            out.flush()
            last = counts
        state, message = experiment_state(obj)
        if state == "Succeeded":
            return obj
        if state == "Failed":
            raise KatibError(f"Katib experiment {name} failed: {message or 'no message'}")
        if clock() >= deadline:
            raise KatibError(f"Katib experiment {name} still running after {timeout_s:.0f}s (left running)")
        sleep(poll_s)


def main(argv: list[str] | None = None) -> int:
    """The trial container's entry (see the module doc): env values → ``sdtune sweeps trial``, which replaces
    this process (the CLI sits above this module; SIGTERM from Kubernetes then reaches it directly)."""
    import os

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        cli_argv = trial_argv([a for a in argv if a != "--print-argv"], dict(os.environ))
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    if "--print-argv" in argv:
        print(json.dumps(cli_argv))
        return 0
    sys.stdout.flush()
    os.execv(sys.executable, [sys.executable, "-m", "sdtune.cli", *cli_argv])


if __name__ == "__main__":
    sys.exit(main())
