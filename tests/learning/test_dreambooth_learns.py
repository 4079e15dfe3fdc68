"""DreamBooth learns the sample robot's trigger, and prior preservation keeps its class: in `make test`.

The recipe (``test_learning.DREAMBOOTH``) trains the whole UNet (LR 2e-5) and the whole text encoder (5e-3)
for 250 steps on the earlier ε-prediction pre-trained base (``--objective epsilon``), with prior preservation
(24 class pictures drawn by the base, weight 3), against the same run without it. Measured on training seeds
0 / 1 / 2 (held-out loss change): with prior, trigger −16.8 / −17.7 / −15.8 %, class −0.9 / −1.8 / −2.2 %,
specificity 16.0 / 16.0 / 13.7 points; without prior, class −26.0 / −25.5 / −26.2 % (specificity ≈ 0.7). The
check (``test_learning.dreambooth_failures``: specificity ≥ 10 points and class within 5 % with prior, ≥ 5
points more class drift without) fails on the same recipe with learning rates 1e-8 (0.0 %) and with the
trigger dropped from the captions (with / without prior: trigger −9.6 / −26.6 %, class −8.7 / −25.9 %,
specificity 0.9 / 0.7 points). About 3 CPU-minutes (five 250-step runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import DREAMBOOTH, NO_TRAINING, _figures, dreambooth_failures

pytestmark = pytest.mark.slow


def test_prior_preservation_keeps_the_class_while_the_trigger_learns(
    learn: Learner, pretrained_base, subject_stage
):
    with_prior = learn(pretrained_base, subject_stage, **DREAMBOOTH)
    without_prior = learn(pretrained_base, subject_stage, **DREAMBOOTH, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) == [], (
        _figures(with_prior),
        _figures(without_prior),
    )


def test_the_check_fails_without_training(learn: Learner, pretrained_base, subject_stage):
    frozen = learn(
        pretrained_base,
        subject_stage,
        **{**DREAMBOOTH, **{k: NO_TRAINING[k] for k in ("learning_rate", "text_encoder_lr")}},
    )
    # Nothing learned with or without prior: the same frozen run stands for both sides.
    assert dreambooth_failures(frozen, frozen) != []


def test_the_check_fails_when_the_trigger_is_dropped(learn: Learner, pretrained_base, untriggered_stage):
    """Captioned with the class only, the class prompt learns the robot: no specificity, class loss moved."""
    with_prior = learn(pretrained_base, untriggered_stage, **DREAMBOOTH)
    without_prior = learn(pretrained_base, untriggered_stage, **DREAMBOOTH, with_prior_preservation=False)
    assert dreambooth_failures(with_prior, without_prior) != []
