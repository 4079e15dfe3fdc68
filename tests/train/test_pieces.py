"""Pure building blocks: sharding, batching, losses, presets."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from sdtune.config import load_config
from sdtune.train import data as D
from sdtune.train import losses as L

REPO = Path(__file__).resolve().parents[2]


def test_shard_covers_everything_and_never_empty():
    items = list(range(5))
    shards = [D.shard(items, r, 2) for r in range(2)]
    assert shards == [[0, 2, 4], [1, 3]]
    assert [D.shard([7], r, 3) for r in range(3)] == [[7], [7], [7]]


def test_index_batches_are_seeded_epochs():
    a = D.index_batches(3, 2, torch.Generator().manual_seed(0))
    b = D.index_batches(3, 2, torch.Generator().manual_seed(0))
    first = [next(a).tolist() for _ in range(3)]
    assert first == [next(b).tolist() for _ in range(3)]
    assert sorted(first[0] + first[1] + first[2]) == [0, 0, 1, 1, 2, 2]  # two whole epochs


def test_min_snr_weighting_and_v_target():
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000)
    pred, target = torch.ones(2, 4, 2, 2), torch.zeros(2, 4, 2, 2)
    t = torch.tensor([10, 900])
    plain = L.diffusion_loss(pred, target)
    assert plain.tolist() == [1.0, 1.0]
    weighted = L.diffusion_loss(pred, target, timesteps=t, scheduler=sched, snr_gamma=5.0)
    snr = L.snr(sched, t)
    assert weighted[0] == pytest.approx(5.0 / snr[0].item())  # high SNR (small t): clamped to gamma
    assert weighted[1] == pytest.approx(1.0)  # low SNR: weight 1 for epsilon
    latents, noise = torch.randn(2, 4, 2, 2), torch.randn(2, 4, 2, 2)
    assert torch.equal(L.prediction_target(sched, latents, noise, t, "epsilon"), noise)
    v = L.prediction_target(sched, latents, noise, t, "v_prediction")
    assert torch.allclose(v, sched.get_velocity(latents, noise, t))


def test_noise_offset_changes_channel_means():
    gen = torch.Generator().manual_seed(0)
    x = torch.zeros(1, 4, 8, 8)
    plain = L.sample_noise(x, torch.Generator().manual_seed(0))
    offset = L.sample_noise(x, gen, noise_offset=1.0)
    assert not torch.equal(plain, offset)


def test_load_image_resizes_and_crops(tmp_path):
    from PIL import Image

    Image.new("RGB", (100, 50), (255, 0, 0)).save(tmp_path / "a.png")
    pixels = D.load_image(tmp_path / "a.png", 32)
    assert pixels.shape == (3, 32, 32) and pixels[0].min() == pytest.approx(1.0)


@pytest.mark.parametrize(
    "preset", sorted(p.relative_to(REPO).as_posix() for p in (REPO / "configs").rglob("*.yaml"))
)
def test_presets_load_and_name_a_launch_command(preset):
    cfg = load_config(REPO / preset)
    text = (REPO / preset).read_text()
    assert text.startswith("#") and "sdtune " in text.splitlines()[1] + text.splitlines()[2]
    assert cfg.train.max_steps >= 1
