"""Each method learns the sample robot on the pre-trained tiny base, and the same checks fail when it cannot.

Numbers are relative changes of the held-out denoising loss (tuned / base − 1, on the 8 held-out views, same
noise for both) with the trigger prompt ("a photo of sks toy robot") and the class prompt ("a photo of toy
robot"), their difference (specificity), and how much closer samples' colours get to those views
(``image_closer_*``, from ``sdtune.evaluate``). Each check is one ``*_failures`` function (empty list = learned)
and is run twice: on the real run, expecting nothing to fail, and on runs that cannot learn the subject (no
training: learning rate 1e-8; the trigger dropped from the captions; the random tiny base of the same shape),
expecting it to fail.

The LoRA recipe is DreamBooth-LoRA: a LoRA on the UNet's cross-attention keys/values and on the text
encoder, with prior preservation (class images from the base in every batch, weight 6). It reaches 12.6 % /
13.9 % specificity with training seeds 0 / 1 and brings trigger samples 39–61 % closer to the subject; a
weaker form of these checks (10 points, 30 % closer) runs in `make test` (test_lora_specificity.py). The bars
here are the issue's: 15 points, and class samples moving less than trigger samples (25–46 % today).

Inpainting (the 9-channel pre-trained base, whole-UNet fine-tune): inside a mask over the robot in each
held-out view the painted colours come ≥ 30 % closer to the subject's than the base's (that half runs in
`make test`: test_inpainting.py), and outside it the output stays within 2× the VAE's own reconstruction error
of the input, which no CPU-sized run reaches yet (docs/evaluation.md, "Inpainting").

DreamBooth trains the whole text encoder beside the UNet (``train_text_encoder``) at a low UNet learning rate,
prior weight 3, 250 steps: with prior preservation specificity 16.0 % / 16.0 % / 13.7 % and the class loss
−0.9 % / −1.8 % / −2.2 % (training seeds 0 / 1 / 2); without it the class loss drifts −26.0 % / −25.5 % /
−26.2 %. A UNet-only DreamBooth lowers both prompts' loss alike (specificity ≈ 1 %, ± prior).

Opt-in (`make test-learning`, SDTUNE_LEARNING_TESTS=1) until the successful-run checks pass: today the LoRA
image half and textual inversion's 10 % fail with the figures docs/evaluation.md lists (the DreamBooth check
passes; pivotal's half runs in `make test` with textual inversion at a 5 % floor: test_embeddings_learn.py),
so `make test` does not collect this file.
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner

CLASS_IMAGES = {"num_class_images": 24, "class_image_steps": 15}
LORA = {
    "method": "lora",
    "max_steps": 300,
    "batch_size": 4,
    "learning_rate": 3e-3,
    "rank": 8,
    "target_modules": ["attn2.to_k", "attn2.to_v"],
    "with_prior_preservation": True,
    "prior_loss_weight": 6.0,
    "train_text_encoder": True,
    "text_encoder_lr": 2e-2,
    **CLASS_IMAGES,
}
# DreamBooth trains the text encoder too: a UNet-only DreamBooth lowers the trigger and the class prompt's loss
# alike on this base. The UNet's lr stays low, so the subject is learned mostly through what the trigger word
# comes to mean (UNet lr 1e-4…2e-4 let the class loss move 6–7 % with seed 1); weight 3 keeps the class put.
DREAMBOOTH = {
    "method": "dreambooth",
    "max_steps": 250,
    "batch_size": 4,
    "learning_rate": 2e-5,
    "train_text_encoder": True,
    "text_encoder_lr": 5e-3,
    "prior_loss_weight": 3.0,
    **CLASS_IMAGES,
}
TEXTUAL_INVERSION = {
    "method": "textual_inversion",
    "max_steps": 200,
    "batch_size": 4,
    "learning_rate": 5e-2,
    "num_vectors": 2,
}
PIVOTAL = {
    **TEXTUAL_INVERSION,
    "method": "pivotal",
    "learning_rate": 1e-2,
    "embedding_learning_rate": 5e-2,
    "rank": 8,
}
INPAINT = {
    "method": "inpaint",
    "inpaint_full_unet": True,  # a LoRA on the attention layers cannot reach conv_in's mask channels
    "inpaint_masks": "both",  # the box around the robot (supplied) plus random masks
    "max_steps": 300,
    "batch_size": 4,
    "learning_rate": 2e-3,
}
NO_TRAINING = {"learning_rate": 1e-8, "embedding_learning_rate": 1e-8, "text_encoder_lr": 1e-8}


def _figures(m: dict) -> dict:
    keys = (
        "loss_change_trigger",
        "loss_change_class",
        "specificity",
        "image_closer_trigger",
        "image_closer_class",
    )
    return {k: round(m[k], 4) for k in keys if k in m}


def specificity_failures(m: dict, floor: float = 0.15, trigger_floor: float = 0.05) -> list[str]:
    """The loss half of :func:`lora_failures`: the trigger loss fell ≥ ``floor`` (the issue's 15 points) more
    than the class loss, and fell itself (≥ ``trigger_floor``): a class loss that rises scores specificity
    too."""
    out = [f"specificity {m['specificity']:.3f} < {floor}"] if m["specificity"] < floor else []
    if m["loss_change_trigger"] > -trigger_floor:
        out.append(f"trigger loss changed only {m['loss_change_trigger']:+.3f} (needs ≤ −{trigger_floor})")
    return out


def lora_failures(m: dict) -> list[str]:
    """What a fine-tune that learned the subject (and not the class) must show; empty when it did."""
    out = specificity_failures(m)
    if m["image_closer_trigger"] < 0.30:
        out.append(f"trigger samples only {m['image_closer_trigger']:.3f} closer to the subject (< 0.30)")
    if m["image_closer_class"] >= m["image_closer_trigger"]:
        out.append("class samples moved toward the subject as much as trigger samples")
    return out


def dreambooth_failures(with_prior: dict, without_prior: dict) -> list[str]:
    """DreamBooth with prior preservation learns the trigger as LoRA does (trigger loss down ≥ 5 %, specificity
    ≥ 10 points, the floors of LoRA's check in `make test`) and keeps the class prompt within 5 % of the base's loss; the same run
    without it drifts the class prompt measurably more (≥ 5 points)."""
    out = [f"with prior: {f}" for f in specificity_failures(with_prior, floor=0.10)]
    if abs(with_prior["loss_change_class"]) > 0.05:
        out.append(f"with prior the class loss moved {with_prior['loss_change_class']:+.3f} (> 5 %)")
    drift = abs(without_prior["loss_change_class"]) - abs(with_prior["loss_change_class"])
    if drift < 0.05:
        out.append(f"without prior the class loss drifts only {drift:+.3f} more than with it (< 0.05)")
    return out


def embedding_failures(
    ti: dict, pivotal: dict, ti_floor: float = 0.10, pivotal_floor: float = 0.10
) -> list[str]:
    """Textual inversion and pivotal tuning: the trigger loss falls ≥ 10 % (``ti_floor``, ``pivotal_floor``),
    no other embedding row changes, and pivotal (embeddings + LoRA) beats textual inversion alone."""
    out = []
    for name, m, floor in (("textual inversion", ti, ti_floor), ("pivotal", pivotal, pivotal_floor)):
        if m["loss_change_trigger"] > -floor:
            out.append(
                f"{name}: trigger loss changed only {m['loss_change_trigger']:+.3f} (needs ≤ −{floor})"
            )
        if m["summary"]["extra"].get("other_embeddings_unchanged") is not True:
            out.append(f"{name}: other embedding rows changed")
    if pivotal["loss_change_trigger"] >= ti["loss_change_trigger"]:
        out.append("pivotal does not beat textual inversion")
    return out


def inpaint_inside_failures(m: dict, floor: float = 0.30) -> list[str]:
    """Inside the mask the subject appears: the painted pixels' hue distance to the subject's pixels in the
    same views is ≥ ``floor`` (30 %) smaller than the base's (``sdtune.evaluate_inpaint``)."""
    closer = m["inpaint_inside_closer"]
    return [f"inside the mask only {closer:.3f} closer to the subject (< {floor})"] if closer < floor else []


def inpaint_failures(m: dict) -> list[str]:
    """Inside the mask the subject appears, and outside it the output stays within 2× the VAE's own
    reconstruction error of the input (the 9-channel pipeline does not paste the kept pixels back, so the
    VAE round trip is the floor; twice it leaves room for the mask edge)."""
    out = inpaint_inside_failures(m)
    limit = 2 * m["inpaint_outside_vae"]
    if m["inpaint_outside_tuned"] > limit:
        out.append(
            f"outside the mask the output moved {m['inpaint_outside_tuned']:.1f} / 255 (> {limit:.1f})"
        )
    return out


# --- LoRA --------------------------------------------------------------------------------------------------

LORA_DEFECTS = ("no_training", "trigger_dropped", "random_base")


def lora_run_that_cannot_learn(
    defect: str,
    learn: Learner,
    pretrained_base,
    random_base,
    subject_stage,
    untriggered_stage,
    recipe: dict = LORA,
) -> dict:
    """The LoRA ``recipe``'s run with one defect: learning rates 1e-8, the trigger dropped from the captions, or
    the random tiny base."""
    base, stage, train = pretrained_base, subject_stage, dict(recipe)
    if defect == "no_training":
        train.update({k: NO_TRAINING[k] for k in ("learning_rate", "text_encoder_lr")})
    elif defect == "trigger_dropped":
        stage = untriggered_stage
    else:
        base = random_base
    return learn(base, stage, **train)


def test_lora_learns_the_subject(learn: Learner, pretrained_base, subject_stage):
    m = learn(pretrained_base, subject_stage, **LORA)
    assert lora_failures(m) == [], _figures(m)


@pytest.mark.parametrize("defect", LORA_DEFECTS)
def test_lora_check_fails_when_nothing_is_learned(
    defect, learn: Learner, pretrained_base, random_base, subject_stage, untriggered_stage
):
    runs = (pretrained_base, random_base, subject_stage, untriggered_stage)
    assert lora_failures(lora_run_that_cannot_learn(defect, learn, *runs)) != []


# --- DreamBooth ± prior preservation -----------------------------------------------------------------------


def test_dreambooth_prior_preservation_keeps_the_class(learn: Learner, pretrained_base, subject_stage):
    with_prior = learn(pretrained_base, subject_stage, **DREAMBOOTH)
    without_prior = learn(pretrained_base, subject_stage, **DREAMBOOTH, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) == [], (
        _figures(with_prior),
        _figures(without_prior),
    )


@pytest.mark.parametrize("defect", ["no_training", "trigger_dropped"])
def test_dreambooth_check_fails_when_nothing_is_learned(
    defect, learn: Learner, pretrained_base, subject_stage, untriggered_stage
):
    stage, train = subject_stage, dict(DREAMBOOTH)
    if defect == "no_training":
        train.update({k: NO_TRAINING[k] for k in ("learning_rate", "text_encoder_lr")})
    else:
        stage = untriggered_stage
    with_prior = learn(pretrained_base, stage, **train)
    without_prior = learn(pretrained_base, stage, **train, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) != []


# --- Textual inversion and pivotal tuning ------------------------------------------------------------------


def test_embeddings_learn_the_subject(learn: Learner, pretrained_base, subject_stage):
    ti = learn(pretrained_base, subject_stage, **TEXTUAL_INVERSION)
    pivotal = learn(pretrained_base, subject_stage, **PIVOTAL)
    assert embedding_failures(ti, pivotal) == [], (_figures(ti), _figures(pivotal))


def test_embedding_check_fails_without_training(learn: Learner, pretrained_base, subject_stage):
    off = {k: NO_TRAINING[k] for k in ("learning_rate", "embedding_learning_rate")}
    ti = learn(pretrained_base, subject_stage, **{**TEXTUAL_INVERSION, "learning_rate": off["learning_rate"]})
    pivotal = learn(pretrained_base, subject_stage, **{**PIVOTAL, **off})
    assert embedding_failures(ti, pivotal) != []


# --- Inpainting --------------------------------------------------------------------------------------------
# The inside half, and its failure on the runs that cannot learn (which fails this whole check too), run in
# `make test`: test_inpainting.py.


@pytest.mark.parametrize("seed", [0, 1])
def test_inpainting_paints_the_subject_and_keeps_the_rest(
    learn: Learner, inpaint_base, masked_subject_stage, seed
):
    m = learn(inpaint_base, masked_subject_stage, **INPAINT, seed=seed)
    assert inpaint_failures(m) == [], {k: round(v, 4) for k, v in m.items() if k.startswith("inpaint_")}
