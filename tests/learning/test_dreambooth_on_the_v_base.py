"""DreamBooth ± prior preservation on the shipped v-prediction base (the one that meets every gate), in
`make test`.

The recipe is ``test_learning.DREAMBOOTH`` (whole UNet at 2e-5, whole text encoder at 5e-3, 250 steps) with the
class pictures drawn at guidance 2 and prior weight 1 (weight 3 held the trigger back with the class: −2.9 % /
−2.8 %, weight 2 −5.8 % / −3.4 %). Measured (held-out loss change trigger / class; trigger / class samples' hue
distance to the held-out views, how much closer than the base's; 16 samples each):
- with prior, training seed 0: −8.7 % / −4.2 %, specificity 4.5 points; samples 53 % / 9 % closer;
  seed 1: −8.8 % / −3.1 %, 5.7 points; samples 48 % / 9 %;
- without prior, seed 0: −12.6 % / −11.6 %; samples 50 % / 43 %; seed 1: −11.8 % / −11.0 %; samples 68 % / 60 %:
  the class prompt learns the robot too.
The trigger dropped from the captions: with prior −6.9 % / −5.8 % (1.0 point; samples 23 % / 27 %). With
learning rates 1e-8 nothing moves. About 3 CPU-minutes (five 250-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import DREAMBOOTH, NO_TRAINING, _figures
from tests.learning.test_lora_on_the_v_base import learning_failures as lora_failures_on_the_v_base

DREAMBOOTH_V = {**DREAMBOOTH, "class_image_guidance": 2.0, "prior_loss_weight": 1.0}
CLASS_LOSS_BOUND = 0.05  # the issue's: with prior the class loss stays within 5 % of the base's
DRIFT_FLOOR, SAMPLE_DRIFT_FLOOR = 0.05, 0.20

pytestmark = pytest.mark.slow


def dreambooth_failures(with_prior: dict, without_prior: dict) -> list[str]:
    """Empty when, with prior preservation, the trigger was learned as the LoRA check on this base requires
    (its loss down ≥ 2 % and ≥ 3 points more than the class's; its samples ≥ 30 % closer to the subject, the
    class's ≥ 20 points less) while the class loss stayed within 5 % of the base's; and when, without it, the
    class drifted measurably more: its loss ≥ 5 points and its samples ≥ 20 points further toward the subject."""
    m = with_prior
    out = [f"with prior: {f}" for f in lora_failures_on_the_v_base(m)]
    if abs(m["loss_change_class"]) > CLASS_LOSS_BOUND:
        out.append(f"with prior the class loss moved {m['loss_change_class']:+.3f} (> {CLASS_LOSS_BOUND})")
    drift = abs(without_prior["loss_change_class"]) - abs(m["loss_change_class"])
    if drift < DRIFT_FLOOR:
        out.append(
            f"without prior the class loss drifts only {drift:+.3f} more than with it (< {DRIFT_FLOOR})"
        )
    sample_drift = without_prior["image_closer_class"] - m["image_closer_class"]
    if sample_drift < SAMPLE_DRIFT_FLOOR:
        out.append(f"without prior class samples move only {sample_drift:+.3f} more (< {SAMPLE_DRIFT_FLOOR})")
    return out


def test_prior_preservation_keeps_the_class_while_the_trigger_learns(learn: Learner, v_base, subject_stage):
    with_prior = learn(v_base, subject_stage, **DREAMBOOTH_V)
    without_prior = learn(v_base, subject_stage, **DREAMBOOTH_V, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) == [], (
        _figures(with_prior),
        _figures(without_prior),
    )


def test_the_check_fails_without_training(learn: Learner, v_base, subject_stage):
    frozen = learn(
        v_base,
        subject_stage,
        **{**DREAMBOOTH_V, **{k: NO_TRAINING[k] for k in ("learning_rate", "text_encoder_lr")}},
    )
    # Nothing learned with or without prior: the same frozen run stands for both sides.
    assert dreambooth_failures(frozen, frozen) != []


def test_the_check_fails_when_the_trigger_is_dropped(learn: Learner, v_base, untriggered_stage):
    """Captioned with the class only, the class prompt learns the robot: no specificity, the class moved."""
    with_prior = learn(v_base, untriggered_stage, **DREAMBOOTH_V)
    without_prior = learn(v_base, untriggered_stage, **DREAMBOOTH_V, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) != []
