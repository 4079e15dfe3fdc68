"""LoRA learns the sample robot's trigger, not its class: the loss half of the learning checks, in `make test`.

DreamBooth-LoRA (prior preservation, weight 6, and a LoRA on the text encoder too; the recipe is
``test_learning.LORA``) on the shipped pre-trained base. Measured (held-out loss change, trigger / class):
training seed 0: −35.4 % / −18.7 %, specificity 16.7 %; seed 1: 15.1 % (weight 4 gave 16.4 % and 13.0 %). The
runs that cannot learn the subject score 0.0 % (no training), 0.4 % (trigger dropped from the captions) and
0.0 % (the random tiny base). The floor here is 10 points: clear of both sides, so a CPU with other round-off
(300 steps amplify it by ±2 points between training seeds) cannot turn a learning run red; the issue's 15-point
bar stays in the opt-in ``test_learning.py``. A UNet-only LoRA scores 0.4 % with or without prior
preservation (docs/evaluation.md). The image half (trigger samples ≥ 30 % closer) does not pass yet.

The same assertion runs on the three runs that cannot learn and must fail there. About 3 CPU-minutes (four
300-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import LORA, NO_TRAINING, specificity_failures

FLOOR = 0.10

pytestmark = pytest.mark.slow


def test_lora_trigger_loss_falls_more_than_the_class_loss(learn: Learner, pretrained_base, subject_stage):
    m = learn(pretrained_base, subject_stage, **LORA)
    assert specificity_failures(m, FLOOR) == [], {
        k: m[k] for k in ("loss_change_trigger", "loss_change_class")
    }


@pytest.mark.parametrize("defect", ["no_training", "trigger_dropped", "random_base"])
def test_specificity_check_fails_when_nothing_is_learned(
    defect, learn: Learner, pretrained_base, random_base, subject_stage, untriggered_stage
):
    base, stage, train = pretrained_base, subject_stage, dict(LORA)
    if defect == "no_training":
        train.update(
            learning_rate=NO_TRAINING["learning_rate"], text_encoder_lr=NO_TRAINING["text_encoder_lr"]
        )
    elif defect == "trigger_dropped":
        stage = untriggered_stage
    else:
        base = random_base
    assert specificity_failures(learn(base, stage, **train), FLOOR) != []
