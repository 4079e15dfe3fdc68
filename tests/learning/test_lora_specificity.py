"""LoRA learns the sample robot's trigger, not its class: the learning check that runs in `make test`.

DreamBooth-LoRA on the earlier ε-prediction pre-trained base (``test_learning.LORA``): a LoRA on the UNet's
cross-attention keys and values (as Custom Diffusion trains) and on the text encoder, with prior preservation
(24 class pictures drawn by the base, weight 6), 300 steps. The subject is the sample robot on the base's own
plain backdrops (12 training views, 8 held-out poses, 32 px), so what is new to the base is the robot alone.

Measured (held-out loss change trigger / class; trigger and class samples' hue distance to the held-out
views, how much closer than the base's; 16 samples each):
- training seed 0: −9.6 % / +3.0 %, specificity 12.6 %; samples 35–43 % / 37–46 % closer (8 to 24 samples,
  two CPUs);
- training seed 1: −11.0 % / +3.0 %, specificity 13.9 %; samples 58–61 % / 25–29 % closer.
The runs that cannot learn the subject: no training 0.0 % specificity, samples 0 % closer; the trigger dropped
from the captions 1.2 % (samples 41 % closer: the class prompt learned the robot); the random tiny base
0.0 % (1 % closer). The floors here — specificity ≥ 10 points and trigger samples ≥ 20 % closer — sit between
the two, with room for another CPU's round-off. The issue's bars (15 points; class samples moving less than trigger samples) stay in
the opt-in ``test_learning.py`` (and its 30 % bar for the samples): training seeds move specificity by
±5 points for the attention-wide LoRA (5.2 % vs 16.0 %) and the class samples' move from 25 % to 46 %, so one
seed cannot carry them.

The same assertion runs on the three runs that cannot learn and must fail there. About 3 CPU-minutes (four
300-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import LORA, LORA_DEFECTS, lora_run_that_cannot_learn

SPECIFICITY_FLOOR = 0.10
CLOSER_FLOOR = 0.20
# Specificity also grows when the class loss rises: on the v-prediction build the recipe scored 40 points with
# the trigger loss unchanged (−0.05 %) and the class loss up 40 %. The trigger loss itself must fall.
TRIGGER_FLOOR = 0.05

pytestmark = pytest.mark.slow


def learning_failures(m: dict) -> list[str]:
    """Empty when the trigger's held-out loss fell ≥ 5 % and ≥ 10 points more than the class's, and trigger
    samples came ≥ 20 % closer to the subject's colours than the base's."""
    out = []
    if m["loss_change_trigger"] > -TRIGGER_FLOOR:
        out.append(f"trigger loss changed only {m['loss_change_trigger']:+.3f} (needs ≤ −{TRIGGER_FLOOR})")
    if m["specificity"] < SPECIFICITY_FLOOR:
        out.append(f"specificity {m['specificity']:.3f} < {SPECIFICITY_FLOOR}")
    if m["image_closer_trigger"] < CLOSER_FLOOR:
        out.append(f"trigger samples only {m['image_closer_trigger']:.3f} closer (< {CLOSER_FLOOR})")
    return out


def _figures(m: dict) -> dict:
    keys = ("loss_change_trigger", "loss_change_class", "image_closer_trigger", "image_closer_class")
    return {k: round(m[k], 4) for k in keys}


def test_lora_learns_the_trigger_not_the_class(learn: Learner, pretrained_base, subject_stage):
    m = learn(pretrained_base, subject_stage, **LORA)
    assert learning_failures(m) == [], _figures(m)


@pytest.mark.parametrize("defect", LORA_DEFECTS)
def test_the_check_fails_when_nothing_is_learned(
    defect, learn: Learner, pretrained_base, random_base, subject_stage, untriggered_stage
):
    runs = (pretrained_base, random_base, subject_stage, untriggered_stage)
    assert learning_failures(lora_run_that_cannot_learn(defect, learn, *runs)) != []


def test_a_rising_class_loss_is_not_learning():
    """The LoRA recipe's run on the v-prediction build (docs/evaluation.md): 40 points of specificity, all of
    it from the class loss rising under prior preservation with class images drawn at guidance 7.5."""
    run = {
        "loss_change_trigger": -0.0005,
        "loss_change_class": 0.4039,
        "specificity": 0.4044,
        "image_closer_trigger": 0.241,
        "image_closer_class": -0.1185,
    }
    assert learning_failures(run) == ["trigger loss changed only -0.001 (needs ≤ −0.05)"]
