"""The model-free loss references and the hue distance used by ``sdtune evaluate``."""

from __future__ import annotations

import torch
from PIL import Image

from sdtune.subject_metrics import hue_distance, hue_histogram, reference_losses


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


def _picture(background, blobs=()):
    image = Image.new("RGB", (32, 32), background)
    for colour, box in blobs:
        image.paste(colour, box)
    return image


ORANGE, TEAL, PURPLE = (245, 130, 30), (0, 150, 150), (130, 50, 180)


def test_hue_distance_sees_the_palette_not_the_background():
    subject = [_picture((235, 235, 235), [(ORANGE, (8, 8, 24, 24)), (TEAL, (8, 0, 24, 8))])]
    # The same palette on a muddy, darker background: the background's pixels do not vote.
    same_palette = [_picture((90, 85, 80), [(ORANGE, (0, 0, 32, 20)), (TEAL, (0, 20, 32, 30))])]
    other_palette = [_picture((235, 235, 235), [(PURPLE, (8, 8, 24, 24))])]
    assert hue_distance(subject, subject) < 1e-9
    assert hue_distance(same_palette, subject) < 0.15
    assert hue_distance(other_palette, subject) == 1.0
    grey = [_picture((128, 128, 128))]
    assert hue_distance(grey, grey) == 0.0
    assert hue_distance(grey, subject) == 1.0


def test_hue_votes_split_between_neighbouring_bins():
    # A hue on the edge between two bins counts half in each, so a tiny shift cannot flip the distance.
    edge = Image.new("HSV", (32, 32), (int(255 / 12), 255, 255)).convert("RGB")
    histogram, voted = hue_histogram([edge])
    assert voted == 1.0
    assert sorted(histogram)[-2] > 0.3
