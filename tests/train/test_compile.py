"""``train.compile``: the step compiles as one graph (no graph breaks), compiled and eager training agree, and
CUDA graphs are refused on a CPU with one line."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.train import compile as K
from tests.train.conftest import make_stage, write_config


@pytest.fixture(scope="module")
def stage_32(tmp_path_factory):
    return make_stage(tmp_path_factory.mktemp("stage32") / "captioned", n=3, holdout=1, size=32)


def _lora_unet(model_dir):
    """The tiny UNet under the LoRA recipe's adapters (``add_lora``, fp32), as ``lora.train`` builds it."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from sdtune.config import RunConfig
    from sdtune.train.adapters import add_lora, to_fp32

    unet = UNet2DConditionModel.from_pretrained(model_dir / "unet", local_files_only=True)
    tc = RunConfig.model_validate({"train": {"snr_gamma": 5.0}}).train
    to_fp32(add_lora(unet, tc, tc.target_modules))
    unet.train()
    scheduler = DDPMScheduler.from_pretrained(model_dir / "scheduler", local_files_only=True)
    return unet, scheduler, tc


def test_step_compiles_as_one_graph(tiny_sdxl):
    """Everything of the step between the random draws and ``backward`` — noising, the LoRA UNet (SDXL: with
    its size/text conditioning), the min-SNR-weighted loss — traces with ``fullgraph=True``: a host sync
    (``.item()``, a boolean-mask index, a Python branch on a tensor) anywhere in it is a graph break and
    fails here. The backend is ``aot_eager`` (the same graph capture as inductor, without its code generation)."""
    from sdtune.train import data as D
    from sdtune.train import losses as L

    unet, scheduler, tc = _lora_unet(tiny_sdxl)
    objective = L.Denoising(scheduler, tc)

    def step(latents, noise, t, text):
        noisy = scheduler.add_noise(latents, noise, t)
        target = L.prediction_target(scheduler, latents, noise, t, objective.prediction_type)
        pred = unet(noisy, t, **D.unet_kwargs(text)).sample
        return objective.loss(pred, target, t).mean()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 4, 4, generator=g)
    text = {
        "prompt_embeds": torch.randn(2, 77, unet.config.cross_attention_dim, generator=g),
        "pooled_embeds": torch.randn(2, 32, generator=g),
        "time_ids": D.size_ids(32, "cpu").repeat(2, 1),
    }
    args = (latents, torch.randn(latents.shape, generator=g), torch.tensor([10, 900]), text)
    loss = compiled(*args)
    loss.backward()
    assert torch.isfinite(loss) and loss.ndim == 0
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    assert torch.allclose(loss, step(*args), rtol=1e-5)


def test_concept_embedding_compiles_as_one_graph():
    """Textual inversion's embedding lookup (new rows as their own parameter) has no data-dependent shape:
    it traces whole, and its gradient reaches only the new rows."""
    from sdtune.train.embeddings import ConceptEmbedding

    table = torch.nn.Embedding(50, 8)
    embedding = ConceptEmbedding(table, torch.tensor([48, 49]))
    compiled = torch.compile(embedding, fullgraph=True, backend="aot_eager")
    ids = torch.tensor([[0, 48, 3, 49, 49]])
    out = compiled(ids)
    assert torch.equal(out[0, 1], embedding.rows[0].detach()) and torch.equal(out[0, 0], table.weight[0])
    out.sum().backward()
    assert torch.equal(embedding.rows.grad, torch.tensor([[1.0] * 8, [2.0] * 8]))
    assert table.weight.grad is None


def test_compiled_training_matches_eager(tmp_path, tiny_sd15, stage_32):
    """The LoRA recipe with ``train.compile=regional`` (inductor) against eager, 10 steps from the same seed,
    batch 1: the losses agree to float round-off (SGD: Adam's normalisation would amplify that round-off).
    With diffusers' own regions (``BasicTransformerBlock``) this failed: inductor's gradients were 10–30 %
    off at batch 1 (losses 1.3e-4 apart by step 9)."""
    import torch._dynamo

    losses = {}
    for mode in ("none", "regional"):
        config = write_config(
            tmp_path / f"{mode}.yaml",
            tiny_sd15,
            preprocess={"resolution": 32},
            train={
                "max_steps": 10,
                "log_every": 1,
                "optimizer": "sgd",
                "learning_rate": 1.0,
                "compile": mode,
            },
        )
        torch._dynamo.reset()
        torch._dynamo.utils.counters.clear()
        out = tmp_path / mode
        assert main(["train", "--config", str(config), "--data", str(stage_32), "--out", str(out)]) == 0
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
        assert (graphs > 0) == (mode != "none")  # the compiled run really ran compiled code
    eager, compiled = losses["none"], losses["regional"]
    assert len(eager) == len(compiled) == 10
    assert compiled == pytest.approx(eager, rel=1e-4)
    lora = load_file(tmp_path / "regional" / "pytorch_lora_weights.safetensors")
    assert any(v.abs().max() > 0 for k, v in lora.items() if ".up." in k)  # trained (LoRA B starts at zero)


def test_validation_samples_without_compiling_the_denoiser_again(tmp_path, tiny_sd15, stage_32, monkeypatch):
    """Validation grids during a compiled run sample with the step's denoiser eagerly: sampling (eval mode, no
    grad, guidance's doubled batch) compiled a second graph of the whole UNet before (37 s of a 41 s tiny run
    on a CPU with a cold inductor cache), to run a few dozen forwards."""
    import torch._dynamo

    monkeypatch.setenv("SDTUNE_COMPILE_BACKEND", "aot_eager")
    settings = {"max_steps": 4, "compile": "default", "validation_every": 2, "validation_inference_steps": 2}
    config = write_config(tmp_path / "c.yaml", tiny_sd15, preprocess={"resolution": 32}, train=settings)
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    out = tmp_path / "o"
    assert main(["train", "--config", str(config), "--data", str(stage_32), "--out", str(out)]) == 0
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step_000002.png", "step_000004.png"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 1  # the training step's, compiled once


def test_graphs_on_cpu_is_a_config_error(tmp_path, tiny_sd15, stage_32, capsys):
    config = write_config(tmp_path / "c.yaml", tiny_sd15, train={"compile": "graphs"})
    assert (
        main(["train", "--config", str(config), "--data", str(stage_32), "--out", str(tmp_path / "o")]) == 2
    )
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: train.compile=graphs needs a CUDA GPU")
    assert not (tmp_path / "o" / "metrics.jsonl").exists()


def test_regional_compiles_the_repeated_blocks(tiny_sd15):
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_sd15 / "unet", local_files_only=True)
    blocks = K.repeated_blocks(unet)
    assert blocks and {type(b).__name__ for b in blocks} == {"Transformer2DModel"}
    K.compile_in_place(unet, "regional")
    assert all(b._compiled_call_impl is not None for b in blocks)
    assert unet._compiled_call_impl is None  # only the blocks, not the whole model
    assert K.compile_in_place(unet, "default") is unet and unet._compiled_call_impl is None  # never twice


@pytest.mark.parametrize(
    ("base", "arch", "train"),
    [
        (
            "tiny_sdxl",
            "sdxl",
            {"method": "pivotal", "num_vectors": 1, "rank": 4, "embedding_train_fraction": 0.5},
        ),
        ("tiny_sd15", "sd15", {"method": "lora", "train_text_encoder": True}),
    ],
)
def test_text_encoders_that_run_in_the_step_compile_with_the_unet(
    request, tmp_path, stage_32, monkeypatch, base, arch, train
):
    """Pivotal tuning's two SDXL encoders (forward and backward, then forward alone once the embeddings
    freeze: a grad-mode switch) and a LoRA'd text encoder compile whole (``fullgraph``) beside the UNet and
    train as they do eagerly (``aot_eager``). Before, they stayed eager: hundreds of kernels launched one by
    one per forward beside a compiled or graphed UNet. On a first, compiled call transformers' output hooks
    were a graph break (``Unsupported context manager``): :func:`K.install_output_hooks`."""
    import torch._dynamo

    monkeypatch.setenv("SDTUNE_COMPILE_BACKEND", "aot_eager")
    compiled: list[str] = []
    real = K.compile_in_place

    def recording(model, mode, **kwargs):
        if mode != "none" and not K.is_compiled(model):
            compiled.append(type(model).__name__)
        return real(model, mode, **kwargs)

    monkeypatch.setattr(K, "compile_in_place", recording)
    losses = {}
    for mode in ("none", "default"):
        settings = {"max_steps": 4, "log_every": 1, "optimizer": "sgd", "learning_rate": 0.5, "compile": mode}
        config = write_config(
            tmp_path / f"{mode}.yaml",
            request.getfixturevalue(base),
            model={"arch": arch},
            preprocess={"resolution": 32},
            train={**settings, **train},
        )
        torch._dynamo.reset()
        out = tmp_path / mode
        assert main(["train", "--config", str(config), "--data", str(stage_32), "--out", str(out)]) == 0
        losses[mode] = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    encoders = ["CLIPTextModel", "CLIPTextModelWithProjection"] if arch == "sdxl" else ["CLIPTextModel"]
    assert sorted(compiled) == sorted(["UNet2DConditionModel", *encoders])
    assert len(losses["none"]) == 4
    assert losses["default"] == pytest.approx(losses["none"], rel=1e-5)
