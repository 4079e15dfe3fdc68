"""The model-free loss references and the colour-histogram distance used by ``sdtune evaluate``."""

from __future__ import annotations

import torch
from PIL import Image

from sdtune.subject_metrics import histogram_distance, reference_losses


def _schedule():
    from diffusers import DDPMScheduler

    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear").alphas_cumprod


def test_references_bracket_what_a_blind_predictor_can_do():
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(64, 4, 8, 8, generator=gen) * 0.3
    noise = torch.randn(latents.shape, generator=gen)
    abar = _schedule()
    refs = reference_losses(latents, noise, abar, [100, 500, 900], "epsilon")
    assert abs(refs["zero"] - float((noise**2).mean())) < 1e-6
    assert refs["variance"] < refs["zero"]
    # The Gaussian posterior mean is the best scaled copy of x_t: scaling it either way does worse.
    for k in (0.8, 1.25):
        worse = 0.0
        for t in (100, 500, 900):
            a = float(abar[t])
            noisy = a**0.5 * latents + (1 - a) ** 0.5 * noise
            gain = (1 - a) ** 0.5 / (a * 0.09 + 1 - a)
            worse += float(((noise - k * gain * noisy) ** 2).mean()) / 3
        assert worse > refs["variance"]


def test_histogram_distance_sees_colour_make_up():
    red = [Image.new("RGB", (32, 32), (220, 30, 40))] * 2
    blue = [Image.new("RGB", (32, 32), (40, 80, 220))]
    half = Image.new("RGB", (32, 32), (220, 30, 40))
    half.paste((40, 80, 220), (0, 0, 32, 16))
    assert histogram_distance(red, red) == 0.0
    assert histogram_distance(red, blue) == 1.0
    assert abs(histogram_distance([half], red) - 0.5) < 1e-9
