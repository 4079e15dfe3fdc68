"""A registered model is stored without a pickle and loads through sdtune's own safetensors-only loader."""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import pytest

from sdtune import tracking
from sdtune.config import RunConfig
from sdtune.registry import register_model

pytestmark = pytest.mark.slow


def test_registered_model_has_no_pickle_and_predicts(sdtune_home, tiny_assets, tmp_path, monkeypatch):
    import mlflow.pyfunc

    from sdtune.models.loading import ModelLoadError
    from sdtune.registry import load_registered

    monkeypatch.chdir(tmp_path)  # the embedded store puts logged models under ./mlruns

    model_dir = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model_dir)  # a full-pipeline model folder, as dreambooth writes
    cfg = RunConfig(name="nopickle")
    cfg.model.base = str(tiny_assets["model"])
    cfg.register.model_name = "nopickle"
    cfg.evaluate.num_inference_steps = 1
    cfg.preprocess.resolution = 32
    cfg.ingest.sources = ["https://user:hunter2@example.com/set.zip?X-Amz-Signature=abc&v=1"]
    parent = tracking.start_parent_run("nopickle", "p", {})
    with tracking.step_run(parent, "register") as run:
        register_model(cfg, model_dir, {"loss_tuned_trigger": 0.5}, run_id=run.run_id)

    local = Path(
        mlflow.artifacts.download_artifacts("models:/nopickle@candidate", dst_path=str(tmp_path / "dl"))
    )
    stored = {p.name for p in local.rglob("*")}
    assert not {n for n in stored if n.endswith((".pkl", ".pickle", ".bin", ".pt", ".ckpt"))}
    mlmodel = (local / "MLmodel").read_text()
    assert "loader_module: sdtune.registry" in mlmodel and "python_model" not in mlmodel
    assert "hunter2" not in mlmodel and "X-Amz-Signature" not in mlmodel  # the config is the storable one

    images = mlflow.pyfunc.load_model("models:/nopickle@candidate").predict(["a photo of sks dog"])
    assert len(images) == 1 and base64.b64decode(images[0]).startswith(b"\x89PNG")
    # sdtune's own loader reads the MLmodel as data and refuses one that names other code to run.
    model = load_registered("models:/nopickle@candidate", tmp_path / "safe")
    assert base64.b64decode(model.predict(["a photo of sks dog"])[0]).startswith(b"\x89PNG")
    store = Path(
        mlflow.artifacts.download_artifacts("models:/nopickle@candidate", dst_path=str(tmp_path / "t"))
    )
    tampered = mlmodel.replace(
        "loader_module: sdtune.registry", "loader_module: sdtune.registry\n    python_model: python_model.pkl"
    )
    (store / "MLmodel").write_text(tampered)
    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", lambda uri, dst_path: str(store))
    with pytest.raises(ModelLoadError, match="refused"):
        load_registered("models:/nopickle@candidate", tmp_path / "t2")


def test_pickled_weights_are_refused_unless_opted_in(tiny_assets, tmp_path, monkeypatch):
    """A text encoder shipped only as ``pytorch_model.bin`` (a pickle) ended in a traceback, exit 1."""
    import torch
    from safetensors.torch import load_file

    from sdtune.models.loading import ModelLoadError, load_components

    model = tmp_path / "model"
    shutil.copytree(tiny_assets["model"], model)
    encoder = model / "text_encoder"
    torch.save(load_file(str(encoder / "model.safetensors")), encoder / "pytorch_model.bin")
    (encoder / "model.safetensors").unlink()
    cfg = RunConfig()
    cfg.model.base = str(model)
    monkeypatch.delenv("SDTUNE_ALLOW_PICKLE_WEIGHTS", raising=False)
    with pytest.raises(ModelLoadError, match="SDTUNE_ALLOW_PICKLE_WEIGHTS=1") as info:
        load_components(cfg)
    assert info.value.exit_code == 2 and "\n" not in str(info.value)
    monkeypatch.setenv("SDTUNE_ALLOW_PICKLE_WEIGHTS", "1")  # the operator's opt-in: weights_only loading
    assert load_components(cfg).text_encoder is not None
