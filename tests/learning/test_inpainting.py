"""Inpainting paints the sample robot inside a mask on the pre-trained tiny base: the inside half of the
inpainting learning check, in `make test`.

The base is ``sdtune models tiny --arch sd15-inpaint --pretrained --objective epsilon`` (the ε text-to-image
base with a 9-channel UNet whose extra input channels start at zero). The recipe (``test_learning.INPAINT``)
fine-tunes the whole UNet for 300 steps on the 12 training views, with the box around the robot as the
supplied mask plus random masks. ``sdtune.evaluate`` (the pipeline's evaluate step; its inpainting probe is
``sdtune.evaluate_inpaint``) masks the box around the robot in each of the 8 held-out views and inpaints it
with the trigger prompt, base and tuned, with the same seeds (2 per view).

Measured (hue distance of the painted pixels to the subject's, 1 − tuned / base): training seed 0: 55.6 %
closer, seed 1: 48.3 %; no training (learning rate 1e-8): −0.2 %; the random tiny base: −8.8 %. The floor is
the issue's 30 %. The outside half (the output keeps the rest of the picture, within 2× the VAE's own round
trip) fails on this base whatever the recipe: it repaints the backdrop in a random shade (docs/evaluation.md,
"Inpainting").

On the v-prediction base (``--objective v``; t = 999 is pure noise, so no shade comes from the start noise) the
same recipe at 600 steps passes both halves: inside 51.6 % closer, outside 12.0 / 255 against a limit of 17.3
(the base: 92.0; 300 steps: 47.3 % and 16.7 with training seed 0, 34.1 % and 12.3 with seed 1). With learning
rates 1e-8 the outside stays at 92.0 and the check fails. About 2.5 CPU-minutes (five runs, each evaluated).
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner
from tests.learning.test_learning import INPAINT, NO_TRAINING, inpaint_failures, inpaint_inside_failures

pytestmark = pytest.mark.slow


def test_inpainting_paints_the_subject_inside_the_mask(learn: Learner, inpaint_base, masked_subject_stage):
    m = learn(inpaint_base, masked_subject_stage, **INPAINT, seed=0)
    assert inpaint_inside_failures(m) == [], {
        k: round(v, 4) for k, v in m.items() if k.startswith("inpaint_")
    }


@pytest.mark.parametrize("defect", ["no_training", "random_base"])
def test_inpainting_inside_check_fails_when_nothing_is_learned(
    defect, learn: Learner, inpaint_base, random_inpaint_base, masked_subject_stage
):
    base, train = inpaint_base, dict(INPAINT)
    if defect == "no_training":
        train["learning_rate"] = NO_TRAINING["learning_rate"]
    else:
        base = random_inpaint_base
    assert inpaint_inside_failures(learn(base, masked_subject_stage, **train)) != []


def test_inpainting_on_the_v_base_keeps_the_rest_of_the_picture(
    learn: Learner, inpaint_v_base, masked_subject_stage
):
    m = learn(inpaint_v_base, masked_subject_stage, **{**INPAINT, "max_steps": 600})
    assert inpaint_failures(m) == [], {k: round(v, 4) for k, v in m.items() if k.startswith("inpaint_")}


def test_the_whole_inpainting_check_fails_without_training(
    learn: Learner, inpaint_v_base, masked_subject_stage
):
    frozen = {**INPAINT, "max_steps": 600, "learning_rate": NO_TRAINING["learning_rate"]}
    m = learn(inpaint_v_base, masked_subject_stage, **frozen)
    assert any(f.startswith("outside the mask") for f in inpaint_failures(m))
    assert inpaint_inside_failures(m) != []
