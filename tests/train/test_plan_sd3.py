"""`sdtune plan` for SD3: the MMDiT and its three text encoders built on the meta device from the configs in
sdtune/train/plan.py count the published sizes, the preset fits an 80 GB card for the stated reasons, and a
config that cannot fit says what does not."""

from __future__ import annotations

import json

from sdtune.cli import main
from sdtune.config import config_from_dict, load_config
from sdtune.train import plan as P
from tests.conftest import REPO_ROOT

PRESET = REPO_ROOT / "configs/sd3/lora_1gpu.yaml"


def test_sd3_medium_parameter_counts_match_the_published_sizes():
    # Published: SD3 medium 2 B MMDiT; CLIP-L 123 M, OpenCLIP bigG 695 M (text towers), T5 v1.1 XXL encoder 4.7 B.
    assert round(P.count_params(P.meta_transformer(P.SD3_TRANSFORMER)) / 1e6, 1) == 2028.3
    counts = [P.sd3_encoder_params(c) for c in (P.CLIP_L_WITH_PROJECTION, P.OPENCLIP_BIGG, P.T5_XXL)]
    assert [round(c / 1e6, 1) for c in counts] == [123.7, 694.7, 4762.3]
    assert round(P.vae_params(P.SD3_VAE) / 1e6, 1) == 83.8
    # LoRA on the 24 joint blocks' q/k/v/out of both streams: 294,912 × rank (docs/methods.md).
    cfg = load_config(PRESET, ["train.rank=1", "train.alpha=1"])
    assert P.lora_params(P.meta_transformer(P.SD3_TRANSFORMER), cfg) == 294_912


def test_the_preset_fits_an_80gb_card_and_says_why(capsys):
    assert main(["plan", str(PRESET), "--gpu", "h100", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["fits"] and plan["arch"] == "sd3" and plan["params_trainable"] == 294_912 * 16
    # bf16 transformer weights + fp32 adapters, no full-model gradients: a LoRA-sized loop.
    assert 2 * 2.028e9 < plan["weights"] < 2 * 2.028e9 + 0.1 * P.GB and plan["grads"] == 4 * 294_912 * 16
    assert 0 < plan["activations"] < plan["weights"] and plan["total"] < 0.2 * plan["capacity"]
    # 1024 px: 4,096 image + 154 text tokens through 24 blocks ≈ 8.5 TFLOP per forward (linear + attention).
    assert 7.5 < plan["fwd_tflop_per_sample"] < 9.5
    notes = " ".join(plan["notes"])
    assert "3 text encoders (5.58 B parameters, the largest 4.76 B)" in notes and "22.1 GiB" in notes
    assert "--mfu" in notes
    assert "\n  transformer " in P.report(P.Plan(**plan))  # the denoiser's row is named for the family


def test_what_does_not_fit_is_named_and_checkpointing_shrinks_it():
    big = ["preprocess.resolution=2048", "train.batch_size=16", "train.gradient_checkpointing=false"]
    plan = P.estimate(load_config(PRESET, big), "a100-80gb")
    assert not plan.fits and plan.total > plan.capacity
    assert "does not fit: the largest share is backward peak" in plan.notes[-1]
    checkpointed = P.estimate(
        load_config(PRESET, [*big[:2], "train.gradient_checkpointing=true"]), "a100-80gb"
    )
    assert checkpointed.activations < plan.activations / 4
    assert checkpointed.seconds_per_step > plan.seconds_per_step  # the recompute
    # A 22 GiB card holds the training loop but not the fp32 encoders while the embeddings are cached.
    small = P.estimate(load_config(PRESET), "l4")
    assert not small.fits and small.total < small.capacity
    assert small.notes[-1] == "does not fit: caching the embeddings alone needs 22.1 GiB"


def test_a_local_sd3_folder_is_planned_from_its_own_configs(tiny_sd3):
    from diffusers import StableDiffusion3Pipeline

    cfg = config_from_dict(
        {"model": {"base": str(tiny_sd3), "arch": "sd3"}, "preprocess": {"resolution": 64}}
    )
    plan = P.estimate(cfg, "l4")
    pipe = StableDiffusion3Pipeline.from_pretrained(tiny_sd3, local_files_only=True)
    assert plan.params_unet == P.count_params(pipe.transformer)
    encoders = (pipe.text_encoder, pipe.text_encoder_2, pipe.text_encoder_3)
    assert plan.params_text_encoders == sum(P.count_params(e) for e in encoders)
    assert plan.params_vae == P.count_params(pipe.vae) and plan.fits


def test_every_sd3_method_is_planned_for_what_it_trains():
    """What trains, per method: LoRA (+ the CLIP encoders' LoRA), new CLIP rows, both, or the whole MMDiT."""
    lora = P.estimate(load_config(PRESET), "h100")
    with_te = P.estimate(load_config(PRESET, ["train.train_text_encoder=true"]), "h100")
    # CLIP-L (12 layers × 768) and bigG (32 × 1280), q/k/v/out at rank 16: 16 × 8 × Σ layers × width.
    assert with_te.params_trainable - lora.params_trainable == 16 * 8 * (12 * 768 + 32 * 1280)
    assert with_te.weights > lora.weights + 2 * (123.7e6 + 694.7e6)  # the bf16 CLIP encoders stay resident
    ti = P.estimate(load_config(PRESET, ["train.method=textual_inversion", "train.num_vectors=4"]), "h100")
    assert ti.params_trainable == 4 * (768 + 1280) and ti.grads == 4 * ti.params_trainable
    pivotal = P.estimate(load_config(PRESET, ["train.method=pivotal", "train.num_vectors=4"]), "h100")
    assert pivotal.params_trainable == lora.params_trainable + ti.params_trainable
    full = P.estimate(load_config(PRESET, ["train.method=full", "train.use_ema=true"]), "h100")
    assert full.params_trainable == full.params_unet and full.weights == 2 * 4 * full.params_unet
    assert full.grads == 4 * full.params_unet
    # More GPU work (the weights' gradients). At batch 1 both steps wait on the host, whose kernel launches
    # are about even: the full backward's weight gradients against the adapters' own kernels.
    assert full.compute_seconds_per_step > lora.compute_seconds_per_step
    assert full.bound == lora.bound == "host"
    sharded = P.estimate(
        load_config(PRESET, ["train.method=dreambooth", "train.parallelism=fsdp"]), "h100", 8
    )
    assert sharded.parallelism == "fsdp" and sharded.grads == 4 * sharded.params_unet / 8
