"""LoRA learns the sample robot's trigger, not its class: the loss half of the learning checks, in `make test`.

DreamBooth-LoRA (prior preservation, weight 2, and a LoRA on the text encoder too; the recipe is
``test_learning.LORA``) on the shipped pre-trained base: the held-out trigger loss falls ≥ 15 points more than
the class loss (measured 37.3 % vs 20.1 %, specificity 17.2 %, seed spread 1.7 %). A UNet-only LoRA scores
0.4 % with or without prior preservation (docs/evaluation.md). The image half (trigger samples ≥ 30 % closer)
does not pass yet and lives in the opt-in ``test_learning.py``.

The same assertion runs on three runs that cannot learn the subject and must fail there: no training
(learning rates 1e-8), the trigger dropped from the captions, and the random tiny base of the same shape.
About 4 CPU-minutes (four 300-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import LORA, NO_TRAINING, specificity_failures

pytestmark = pytest.mark.slow


def test_lora_trigger_loss_falls_more_than_the_class_loss(learn: Learner, pretrained_base, subject_stage):
    m = learn(pretrained_base, subject_stage, **LORA)
    assert specificity_failures(m) == [], {k: m[k] for k in ("loss_change_trigger", "loss_change_class")}


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
    assert specificity_failures(learn(base, stage, **train)) != []
