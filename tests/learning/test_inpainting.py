"""Inpainting learns the sample robot on the pre-trained tiny base: inside a mask over the robot the subject
appears, and the same check fails on runs that cannot learn it.

The base is ``sdtune models tiny --arch sd15-inpaint --pretrained``: the shipped text-to-image base with a
9-channel UNet whose extra input channels start at zero. The recipe (``INPAINT``) fine-tunes the whole UNet on
the 12 training views with the box around the robot as the supplied mask plus random masks
(``inpaint_masks: both``). ``sdtune.evaluate_inpaint`` then masks the box around the robot in each of the 8
held-out views and inpaints it with the trigger prompt, base and tuned, same seeds (2 per view).

Figures: docs/evaluation.md ("Inpainting").
"""

from __future__ import annotations

import pytest

from tests.learning.conftest import Learner

pytestmark = pytest.mark.slow

INPAINT = {
    "method": "inpaint",
    "inpaint_full_unet": True,
    "inpaint_masks": "both",
    "max_steps": 300,
    "batch_size": 4,
    "learning_rate": 2e-3,
}
INSIDE_FLOOR = 0.30


def _figures(m: dict) -> dict:
    return {k: round(v, 4) for k, v in m.items() if k.startswith("inpaint_")}


def inside_failures(m: dict, floor: float = INSIDE_FLOOR) -> list[str]:
    """The painted region's colours came ≥ ``floor`` closer to the subject's than the base's did."""
    closer = m["inpaint_inside_closer"]
    return [f"inside the mask only {closer:.3f} closer to the subject (< {floor})"] if closer < floor else []


@pytest.mark.parametrize("seed", [0, 1])
def test_inpainting_paints_the_subject_inside_the_mask(
    learn: Learner, inpaint_base, masked_subject_stage, seed
):
    m = learn(inpaint_base, masked_subject_stage, **INPAINT, seed=seed)
    assert inside_failures(m) == [], _figures(m)


@pytest.mark.parametrize("defect", ["no_training", "random_base"])
def test_inpainting_check_fails_when_nothing_is_learned(
    defect, learn: Learner, inpaint_base, random_inpaint_base, masked_subject_stage
):
    base, train = inpaint_base, dict(INPAINT)
    if defect == "no_training":
        train["learning_rate"] = 1e-8
    else:
        base = random_inpaint_base
    assert inside_failures(learn(base, masked_subject_stage, **train)) != [], defect
