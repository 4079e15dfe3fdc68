"""Each method learns the sample robot on the pre-trained tiny base, and the same checks fail when it cannot.

Numbers are relative changes of the held-out denoising loss (tuned / base − 1, on the 8 held-out views, same
noise for both) and of the colour-histogram distance of samples to those views (``sdtune.evaluate``).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner

LORA = {"method": "lora", "max_steps": 150, "batch_size": 4, "learning_rate": 3e-3, "rank": 4}
TINY_LR = 1e-12  # "training disabled": the config refuses 0, and 1e-12 moves no weight of a 32-bit float


def lora_failures(m: dict) -> list[str]:
    """What a LoRA that learned the subject (and not the class) must show; empty when it did."""
    out = []
    if m["specificity"] < 0.15:
        out.append(f"specificity {m['specificity']:.3f} < 0.15")
    if m["image_closer_trigger"] < 0.30:
        out.append(f"trigger samples only {m['image_closer_trigger']:.3f} closer to the subject (< 0.30)")
    if m["image_closer_class"] >= m["image_closer_trigger"]:
        out.append("class samples moved toward the subject as much as trigger samples")
    return out


def test_lora_learns_the_subject(learn: Learner, pretrained_base, subject_stage):
    m = learn(pretrained_base, subject_stage, **LORA)
    assert lora_failures(m) == [], m


@pytest.mark.parametrize(
    "sabotage",
    [
        pytest.param({"learning_rate": TINY_LR}, id="training-disabled"),
        pytest.param("untriggered", id="trigger-dropped"),
    ],
)
def test_lora_checks_fail_when_it_cannot_learn(sabotage, learn, pretrained_base, subject_stage, untriggered_stage):
    stage = untriggered_stage if sabotage == "untriggered" else subject_stage
    m = learn(pretrained_base, stage, **{**LORA, **(sabotage if isinstance(sabotage, dict) else {})})
    assert lora_failures(m), m


def test_lora_checks_fail_on_the_random_base(learn: Learner, random_base, subject_stage):
    """Not a learning test if it passes on random weights: there the same run shows no subject."""
    m = learn(random_base, subject_stage, **LORA)
    assert lora_failures(m), m
