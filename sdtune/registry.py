"""Model registry: a trained model becomes an MLflow model version that people can load and compare.

The version is a ``pyfunc`` text-to-image model whose artifacts are the training outputs as they are
(``pytorch_lora_weights.safetensors`` etc., loadable by diffusers, ComfyUI and A1111 without MLflow), so
``mlflow.pyfunc.load_model("models:/NAME@candidate").predict(["a photo of sks dog"])`` returns images. The base
model is referenced (hub id, folder or ``s3://``), not copied.

Nothing in the stored model is pickled or executed: the MLmodel names this module as its loader
(``loader_module``), which reads the config (JSON through the budgeted YAML loader, credentials stripped)
and weights from ``.safetensors`` files only. A cloudpickled ``PythonModel`` would run whatever bytes
anyone with write access to the MLflow artifact store put there on every machine that loads the champion.
"""

from __future__ import annotations

import base64
import io
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sdtune import tracking
from sdtune.config import RunConfig, config_from_yaml
from sdtune.models.loading import ModelLoadError


class TextToImageModel:
    """What ``mlflow.pyfunc.load_model`` returns the wrapped form of: base pipeline + the trained adapter;
    input prompts, output PNGs (base64)."""

    def __init__(self, cfg: RunConfig, model_dir: Path):
        self.pipe = load_trained_pipeline(cfg, Path(model_dir))
        self.steps = cfg.evaluate.num_inference_steps
        self.guidance = cfg.evaluate.guidance_scale
        self.resolution = cfg.preprocess.resolution

    # No type hints on predict: MLflow would try to derive a (wrong) input schema from them.
    def predict(self, model_input, params=None):
        import torch

        prompts = list(model_input["prompt"] if hasattr(model_input, "columns") else model_input)
        seed = int((params or {}).get("seed", 0))
        out = []
        for i, prompt in enumerate(prompts):
            generator = torch.Generator("cpu").manual_seed(seed + i)
            image = self.pipe(
                prompt,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance,
                height=self.resolution,
                width=self.resolution,
                generator=generator,
            ).images[0]
            buffer = io.BytesIO()
            image.save(buffer, format="PNG")
            out.append(base64.b64encode(buffer.getvalue()).decode("ascii"))
        return out


def _load_pyfunc(data_path: str, model_config: dict[str, Any] | None = None) -> TextToImageModel:
    """MLflow's ``loader_module`` entry point: ``data_path`` is the logged model folder."""
    if not model_config or "config" not in model_config:
        raise ValueError("this sdtune model has no model_config['config']; log it with register_model")
    return TextToImageModel(config_from_yaml(model_config["config"]), Path(data_path))


def load_registered(model_uri: str, dst: str | Path) -> TextToImageModel:
    """Load a registered sdtune model without letting its stored MLmodel choose the code that runs.

    ``mlflow.pyfunc.load_model`` imports whatever the MLmodel names (a ``python_model`` pickle, extra
    ``code_paths``), and anyone who can write to the artifact store can edit that file. This reads the
    MLmodel as data, accepts only this module as the loader with nothing else to run, and then loads the
    config (budgeted YAML) and weights (safetensors) itself."""
    import mlflow.artifacts

    from sdtune.config import load_yaml
    from sdtune.errors import ConfigError

    local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=str(dst)))
    try:
        mlmodel = load_yaml((local / "MLmodel").read_text(encoding="utf-8"), f"{model_uri} MLmodel") or {}
    except (OSError, ConfigError) as exc:
        raise ModelLoadError(f"{model_uri}: no readable MLmodel ({exc})") from None
    flavors = mlmodel.get("flavors") if isinstance(mlmodel, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    if (
        not isinstance(pyfunc, dict)
        or set(flavors) != {"python_function"}
        or pyfunc.get("loader_module") != __name__
        or pyfunc.get("code")
        or pyfunc.get("python_model")
        or not isinstance(pyfunc.get("data"), str)
    ):
        raise ModelLoadError(
            f"{model_uri}: its MLmodel is not the one sdtune registers (another loader or code to run); refused"
        )
    data = (local / pyfunc["data"]).resolve()
    if not data.is_relative_to(local.resolve()):
        raise ModelLoadError(f"{model_uri}: its MLmodel points outside the model folder; refused")
    return _load_pyfunc(str(data), pyfunc.get("config"))


def load_trained_pipeline(cfg: RunConfig, model_dir: Path) -> Any:
    """A training run's model: its own pipeline folder (dreambooth, full, full inpaint), or the base pipeline
    (inpainting pipeline for an inpainting base) with its LoRA weights (UNet and text encoders) and learned
    embeddings applied."""
    from sdtune.models.loading import load_pipeline

    model_dir = Path(model_dir)
    if (model_dir / "model_index.json").is_file():
        return load_pipeline(cfg, str(model_dir))
    pipe = load_pipeline(cfg)
    if (model_dir / "learned_embeds.safetensors").is_file():
        from sdtune.train.embeddings import load_into_pipeline

        load_into_pipeline(pipe, model_dir / "learned_embeds.safetensors")
    if (model_dir / "pytorch_lora_weights.safetensors").is_file():
        pipe.load_lora_weights(str(model_dir), weight_name="pytorch_lora_weights.safetensors")
    return pipe


def register_model(
    cfg: RunConfig,
    model_dir: Path | None,
    metrics: dict[str, float],
    run_id: str | None,
    model_uri: str | None = None,
) -> dict[str, Any]:
    """Log the model under ``run_id``, create a registered version, set ``cfg.register.alias`` on it.

    With ``model_uri`` (an ``s3://`` prefix holding the training outputs, see sdtune.cluster.outputs) the
    version points at that prefix: only the small MLmodel files are written beside the outputs, the
    weights are not uploaded again. Loading it then reads the prefix directly (S3 credentials needed)."""
    import mlflow
    import mlflow.pyfunc

    client = tracking.mlflow_client()
    name = cfg.register.model_name
    stored = cfg.storable()
    model_config = {"config": stored.to_param(), "base_model": stored.model.base, "method": cfg.train.method}
    if model_uri:
        _describe_in_place(model_uri, model_config)
        _ensure_registered_model(client, name)
        version = client.create_model_version(name, model_uri.rstrip("/"), run_id=run_id)
    else:
        with mlflow.start_run(run_id=run_id) if run_id else _new_run(cfg):
            info = mlflow.pyfunc.log_model(
                name="model",
                loader_module="sdtune.registry",
                data_path=str(model_dir),
                model_config=model_config,
                # Explicit requirements: inferring them imports and profiles the model (slow, heavy).
                pip_requirements=[f"sdtune=={_version()}"],
            )
        version = mlflow.register_model(info.model_uri, name)
    for key, value in metrics.items():
        # repr round-trips exactly: the gate later compares against this very value
        client.set_model_version_tag(name, version.version, f"metric.{key}", repr(float(value)))
    client.set_model_version_tag(name, version.version, "sdtune.base_model", stored.model.base)
    client.set_registered_model_alias(name, cfg.register.alias, version.version)
    decision = gate(client, cfg, version.version, metrics)
    if decision.promote:
        client.set_registered_model_alias(name, cfg.register.champion_alias, version.version)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, version.version, key, value)
    return {
        "name": name,
        "version": int(version.version),
        "alias": cfg.register.alias,
        "uri": f"models:/{name}@{cfg.register.alias}",
        "gate": decision.as_dict(),
        "gate_tags": decision.tags(),
    }


def _describe_in_place(model_uri: str, model_config: dict[str, Any]) -> None:
    """Write the MLmodel (and its environment files, a few hundred bytes) into ``model_uri``: the folder
    itself is the pyfunc's data (``data: .``), read by :func:`_load_pyfunc` like a logged model."""
    import tempfile

    import mlflow.pyfunc
    from mlflow.models import Model

    from sdtune.staging import upload_dir

    with tempfile.TemporaryDirectory() as tmp:
        described = Path(tmp) / "model"
        mlflow.pyfunc.save_model(
            path=str(described),
            loader_module="sdtune.registry",
            model_config=model_config,
            pip_requirements=[f"sdtune=={_version()}"],
        )
        mlmodel = Model.load(str(described / "MLmodel"))
        mlmodel.flavors["python_function"]["data"] = "."
        mlmodel.save(str(described / "MLmodel"))
        upload_dir(described, model_uri)


def _ensure_registered_model(client, name: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.create_registered_model(name)
    except MlflowException as exc:
        if exc.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise


@dataclass
class GateDecision:
    """Whether a candidate replaces the champion, with both metric values and the reason."""

    promote: bool
    reason: str
    metric: str
    candidate: float | None
    champion: float | None
    champion_version: str | None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def tags(self) -> dict[str, str]:
        return {
            "gate.decision": "promoted" if self.promote else "kept_champion",
            "gate.reason": self.reason,
            "gate.metric": self.metric,
            "gate.candidate": "" if self.candidate is None else f"{self.candidate:.6g}",
            "gate.champion": "" if self.champion is None else f"{self.champion:.6g}",
        }


def decide(
    candidate: float | None, champion: float | None, direction: str, margin: float
) -> tuple[bool, str]:
    """The gate rule itself, kept pure so it is easy to test and to explain."""
    if champion is None:
        return True, "no champion yet"
    if candidate is None:
        return False, "candidate has no value for the gate metric"
    better = candidate < champion - margin if direction == "minimize" else candidate > champion + margin
    word = "beats" if better else "does not beat"
    return (
        better,
        f"candidate {candidate:.6g} {word} champion {champion:.6g} ({direction}, margin {margin:g})",
    )


def gate(client: Any, cfg: RunConfig, candidate_version: str, metrics: dict[str, float]) -> GateDecision:
    reg = cfg.register
    champion_version = champion_value = None
    try:
        champion = client.get_model_version_by_alias(reg.model_name, reg.champion_alias)
    except Exception:  # no such alias yet: MLflow raises RestException / MlflowException
        champion = None
    if champion is not None and str(champion.version) != str(candidate_version):
        champion_version = str(champion.version)
        raw = champion.tags.get(f"metric.{reg.gate_metric}")
        champion_value = float(raw) if raw not in (None, "") else None
        if champion_value is None:
            # A champion without the metric cannot be compared: never replace it silently.
            return GateDecision(
                False,
                f"champion v{champion_version} has no {reg.gate_metric}",
                reg.gate_metric,
                metrics.get(reg.gate_metric),
                None,
                champion_version,
            )
    promote, reason = decide(
        metrics.get(reg.gate_metric), champion_value, reg.gate_direction, reg.gate_margin
    )
    return GateDecision(
        promote, reason, reg.gate_metric, metrics.get(reg.gate_metric), champion_value, champion_version
    )


def _new_run(cfg: RunConfig):
    import mlflow

    mlflow.set_experiment(cfg.tracking.experiment)
    return mlflow.start_run(run_name=f"{cfg.name}-register")


def _version() -> str:
    from sdtune import __version__

    return __version__
