"""The shipped pre-trained tiny SD 1.x: its weights are the ones its card names, and it passes its gates."""

from __future__ import annotations

import random
import re

import numpy as np
import pytest
import torch

from sdtune.cli import main
from sdtune.data.sample import ORANGE, TEAL, render_scene
from sdtune.models import base_checks
from sdtune.models import pretrain_data as P
from sdtune.models.pretrain import weight_digests
from sdtune.models.tiny import PRETRAINED_DIR, PRETRAINED_DIRS, PRETRAINED_V_DIR, build_tiny


@pytest.mark.parametrize("objective", sorted(PRETRAINED_DIRS))
def test_shipped_weights_are_the_ones_the_card_names(objective):
    folder = PRETRAINED_DIRS[objective]
    card = (folder / "MODEL_CARD.md").read_text(encoding="utf-8")
    named = dict((path, sha) for sha, path in re.findall(r"^\s+([0-9a-f]{64})  (\S+)$", card, re.M))
    assert named and named == weight_digests(folder)
    size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    assert size < 20 * 2**20


def test_shipped_base_passes_every_gate():
    """The shipped base (``--pretrained``: v-prediction, zero terminal SNR): VAE PSNR ≥ 20 dB, posterior std
    ≤ 0.1, colour of samples right ≥ 80 %, caption gap ≥ 20 % (measured 22.5 dB, 0.049, 93.1 %, 24.1 %); the
    earlier ε build (``--objective epsilon``) misses the last two."""
    measured = base_checks.measure(PRETRAINED_V_DIR)
    assert base_checks.failed_gates(measured) == [], measured


@pytest.fixture(scope="module")
def measured_pretrained() -> dict[str, float]:
    return base_checks.measure(PRETRAINED_DIR)


@pytest.fixture(scope="module")
def measured_random(tiny_sd15) -> dict[str, float]:
    return base_checks.measure(tiny_sd15)


def test_pretrained_base_is_a_model_of_its_domain(measured_pretrained, measured_random):
    """What the earlier ε build does achieve, each beyond what the random model of the same shape reaches."""
    ok = measured_pretrained
    assert ok["vae_psnr_db"] >= base_checks.GATES["vae_psnr_db"] > measured_random["vae_psnr_db"]
    assert ok["posterior_std"] < 0.15 < measured_random["posterior_std"]
    chance = 1 / len(P.COLOURS)
    assert ok["colour_accuracy"] >= 2 * chance > measured_random["colour_accuracy"]
    assert ok["caption_gap"] >= 0.05 > measured_random["caption_gap"]


def test_random_base_fails_every_gate(measured_random):
    """The gates can fail: the random tiny model (same architecture) misses every one of them."""
    assert len(base_checks.failed_gates(measured_random)) == len(base_checks.GATES), measured_random


def test_colour_classifier_reads_the_drawn_colour():
    scenes, images = base_checks.held_out_scenes(200, [(c, o) for c in P.COLOURS for o in P.OBJECTS])
    assert all(base_checks.dominant_colour(im) == s.colour for s, im in zip(scenes, images, strict=True))


def _subject_share(image) -> float:
    """Share of pixels near the subject's body (orange) times share near its head (teal)."""
    arr = np.asarray(image.convert("RGB"), dtype=np.float32).reshape(-1, 3)
    near = lambda c: float((np.linalg.norm(arr - np.array(c), axis=1) < 50).mean())  # noqa: E731
    return near(ORANGE) * near(TEAL)


def test_sample_subject_is_never_in_the_pretraining_data():
    rng = random.Random(0)  # the pre-training seed
    scenes = [P.random_scene(rng) for _ in range(2000)]
    assert all("sks" not in P.caption(s, rng).split() for s in scenes)
    assert not {(s.colour, s.obj) for s in scenes} & P.HELD_OUT
    drawn = max(_subject_share(P.render(s, rng)) for s in scenes[:600])
    subject = [_subject_share(render_scene(i).resize((32, 32))) for i in range(20)]  # the check can see it
    assert drawn == 0.0 and sum(share > 0 for share in subject) >= 18, (drawn, subject)


def test_cli_builds_the_pretrained_base_and_its_inpainting_variant(tmp_path, capsys):
    """``--pretrained`` is the v-prediction base; ``--objective epsilon`` the earlier ε one."""
    assert main(["models", "tiny", "--arch", "sd15", "--pretrained", "--out", str(tmp_path / "t2i")]) == 0
    assert weight_digests(tmp_path / "t2i") == weight_digests(PRETRAINED_V_DIR)
    inpaint = build_tiny("sd15-inpaint", tmp_path / "inpaint", pretrained=True)
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(inpaint / "unet")
    base = UNet2DConditionModel.from_pretrained(PRETRAINED_V_DIR / "unet")
    assert unet.config.in_channels == 9
    assert torch.equal(unet.conv_in.weight[:, :4], base.conv_in.weight)
    assert not unet.conv_in.weight[:, 4:].any()  # the new channels start silent
    capsys.readouterr()
    assert main(["models", "tiny", "--arch", "sdxl", "--pretrained", "--out", str(tmp_path / "x")]) == 2
    assert "no pre-trained weights for 'sdxl'" in capsys.readouterr().err
    eps_args = [
        "models",
        "tiny",
        "--arch",
        "sd15",
        "--pretrained",
        "--objective",
        "epsilon",
        "--out",
        str(tmp_path / "eps"),
    ]
    assert main(eps_args) == 0
    assert (
        weight_digests(tmp_path / "eps") == weight_digests(PRETRAINED_DIR) != weight_digests(PRETRAINED_V_DIR)
    )
    capsys.readouterr()
    assert main([*eps_args[:-3], "x0", "--out", str(tmp_path / "x0")]) == 2
    assert "unknown objective 'x0'" in capsys.readouterr().err
    assert main(["models", "tiny", "--objective", "v", "--out", str(tmp_path / "r")]) == 2
    assert "add --pretrained" in capsys.readouterr().err


def test_pretrain_writes_a_loadable_pipeline_and_its_record(tmp_path):
    """The build command's code path, at a few steps (the shipped weights took thousands)."""
    import json

    from diffusers import StableDiffusionPipeline

    from sdtune.models.pretrain import PretrainRecipe, pretrain

    recipe = PretrainRecipe(
        pool_size=32,
        vae_steps=2,
        vae_batch=4,
        unet_steps=2,
        unet_batch=4,
        warmup_steps=1,
        prediction_type="v_prediction",
        zero_terminal_snr=True,
    )
    out = pretrain(tmp_path / "base", recipe, log=lambda _: None)
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    assert pipe.scheduler.config.clip_sample is False  # DDIM would otherwise clip latents to ±1
    # v-prediction on a zero-terminal-SNR schedule: at t = 999 no trace of the picture is left in the noise,
    # so the colours come from the prompt (with ε and the default schedule they leaked from the start noise).
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    from diffusers import DDPMScheduler

    assert float(DDPMScheduler.from_config(pipe.scheduler.config).alphas_cumprod[-1]) < 1e-6
    meta = json.loads((out / "sdtune_tiny.json").read_text())
    assert meta["unet_steps_done"] == 2 and meta["recipe"]["seed"] == 0
    table = pipe.text_encoder.get_input_embeddings().weight
    trigger = pipe.tokenizer.convert_tokens_to_ids("sks</w>")
    used = pipe.tokenizer.convert_tokens_to_ids("red</w>")
    # The never-trained trigger row was brought to the trained rows' scale (not left ~10x shorter).
    assert float(table[trigger].norm()) > 0.5 * float(table[used].norm())

    # A continuation (`--init-from`, here with a noise offset) keeps the VAE and trains the UNet on.
    import dataclasses

    more = dataclasses.replace(recipe, init_from=str(out), noise_offset=0.1)
    cont = StableDiffusionPipeline.from_pretrained(
        pretrain(tmp_path / "more", more, log=lambda _: None), local_files_only=True
    )
    assert cont.vae.config.scaling_factor == pipe.vae.config.scaling_factor
    assert all(torch.equal(a, b) for a, b in zip(cont.vae.parameters(), pipe.vae.parameters(), strict=True))
    assert not torch.equal(cont.unet.conv_out.weight, pipe.unet.conv_out.weight)
    assert json.loads((tmp_path / "more" / "sdtune_tiny.json").read_text())["recipe"]["noise_offset"] == 0.1
    # Its record keeps the first run's, so the card of a continued base still says how the whole was built
    # (and rebuilds it with both commands), and no component config names the folder it was loaded from.
    from sdtune.models.pretrain import build_commands

    record = json.loads((tmp_path / "more" / "sdtune_tiny.json").read_text())
    assert [s["unet_steps_done"] for s in record["earlier_stages"]] == [2]
    assert record["earlier_stages"][0]["recipe"]["init_from"] is None
    commands = build_commands([s["recipe"] for s in [*record["earlier_stages"], record]])
    assert commands.count("sdtune models pretrain") == 2 and "--init-from .sdtune/pretrain-stage1" in commands
    for part in ("unet", "vae"):
        assert "_name_or_path" not in json.loads((tmp_path / "more" / part / "config.json").read_text())
