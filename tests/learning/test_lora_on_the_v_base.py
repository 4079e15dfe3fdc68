"""LoRA learns the sample robot on the v-prediction base, the one that meets every gate: the issue's image
bars, in `make test`.

The base is ``sdtune models tiny --pretrained --objective v``; the recipe is ``test_learning.LORA`` with the
class images drawn at guidance 2 (``class_image_guidance``: at 7.5 the class prompt's held-out loss rose
22–40 %, docs/evaluation.md). Fine-tuning moves this base's held-out losses about half as much as the ε
base's, so the loss floors here are low; the samples carry the evidence. Measured (held-out loss change
trigger / class; trigger / class samples' hue distance to the held-out views, how much closer than the
base's; 16 samples each):
- training seed 0: −5.3 % / +0.4 %, specificity 5.7 points; samples 65 % / 1 % closer;
- training seed 1: −2.2 % / +5.4 %, 7.5 points; samples 44 % / 3 % closer.
The runs that cannot learn: the trigger dropped from the captions −3.2 % / −2.2 % (0.9 points; samples 25 % /
25 %: the class prompt learned the robot); the random tiny base −7.9 % / −7.9 % (collapse; samples 0.4 %
farther); learning rates 1e-8: nothing moves. About 2.5 CPU-minutes (four 300-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import (
    LORA,
    LORA_DEFECTS,
    _figures,
    lora_run_that_cannot_learn,
    specificity_failures,
)

LORA_V = {**LORA, "class_image_guidance": 2.0}
CLOSER_FLOOR = 0.30  # the bar
CLASS_LAG = 0.20  # class samples move at least this much less than trigger samples
TRIGGER_FLOOR, SPECIFICITY_FLOOR = 0.02, 0.03

pytestmark = pytest.mark.slow


def learning_failures(m: dict) -> list[str]:
    """Empty when trigger samples came ≥ 30 % closer to the subject, class samples ≥ 20 points less, and the
    trigger's held-out loss fell ≥ 2 % and ≥ 3 points more than the class's."""
    out = []
    if m["image_closer_trigger"] < CLOSER_FLOOR:
        out.append(f"trigger samples only {m['image_closer_trigger']:.3f} closer (< {CLOSER_FLOOR})")
    if m["image_closer_trigger"] - m["image_closer_class"] < CLASS_LAG:
        out.append(
            f"class samples moved {m['image_closer_class']:.3f}, not {CLASS_LAG} less than trigger samples"
        )
    return out + specificity_failures(m, floor=SPECIFICITY_FLOOR, trigger_floor=TRIGGER_FLOOR)


def test_lora_on_the_v_base_learns_the_trigger_not_the_class(learn: Learner, v_base, subject_stage):
    m = learn(v_base, subject_stage, **LORA_V)
    assert learning_failures(m) == [], _figures(m)


@pytest.mark.parametrize("defect", LORA_DEFECTS)
def test_the_check_fails_when_nothing_is_learned(
    defect, learn: Learner, v_base, random_base, subject_stage, untriggered_stage
):
    runs = (v_base, random_base, subject_stage, untriggered_stage)
    assert learning_failures(lora_run_that_cannot_learn(defect, learn, *runs, recipe=LORA_V)) != []
