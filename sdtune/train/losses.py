"""The denoising objectives: pure functions for noise, targets and losses (no optimizer, no I/O), and the two
objectives recipes use, :class:`Denoising` and :class:`FlowMatching` (``add_noise`` → :class:`Noised`, ``loss``).

DDPM-style (SD 1.x/2.x/SDXL): epsilon / v-prediction targets, min-SNR-γ. Flow matching (SD3):
:func:`sample_flow_timesteps`, :func:`flow_noisy`, :func:`flow_target`."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F


def _randn(shape, generator, device, dtype) -> torch.Tensor:
    if hasattr(generator, "randn"):  # a data.GlobalDraw: this rank's slice of the global batch's draw
        return generator.randn(shape, device, dtype)
    return torch.randn(shape, generator=generator, device=device, dtype=dtype)


def sample_noise(latents: torch.Tensor, generator, noise_offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise like ``latents``; ``noise_offset`` adds a per-channel constant (brightness range).
    ``generator``: a ``torch.Generator`` or a :class:`sdtune.train.data.GlobalDraw`."""
    noise = _randn(latents.shape, generator, latents.device, latents.dtype)
    if noise_offset:
        b, c = latents.shape[:2]
        noise = noise + noise_offset * _randn((b, c, 1, 1), generator, latents.device, latents.dtype)
    return noise


def sample_timesteps(n: int, num_train_timesteps: int, generator, device) -> torch.Tensor:
    if hasattr(generator, "randint"):
        return generator.randint(num_train_timesteps, n, device)
    return torch.randint(0, num_train_timesteps, (n,), generator=generator, device=device, dtype=torch.long)


def prediction_target(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction, SD 2.x 768)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"unsupported prediction_type {prediction_type!r}")


def snr(scheduler, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_t^2 / sigma_t^2 of each timestep."""
    alphas_cumprod = scheduler.alphas_cumprod.to(device=timesteps.device, dtype=torch.float32)[timesteps]
    return alphas_cumprod / (1.0 - alphas_cumprod)


def diffusion_loss(
    pred: torch.Tensor,
    target: torch.Tensor,
    *,
    timesteps: torch.Tensor | None = None,
    scheduler=None,
    snr_gamma: float | None = None,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    """Per-sample MSE (shape ``[batch]``), min-SNR-γ weighted when ``snr_gamma`` is set (Hang et al. 2023)."""
    per_sample = F.mse_loss(pred.float(), target.float(), reduction="none").mean(
        dim=list(range(1, pred.ndim))
    )
    if snr_gamma is None:
        return per_sample
    ratio = snr(scheduler, timesteps)
    weight = torch.clamp(ratio, max=snr_gamma)
    weight = weight / ratio if prediction_type == "epsilon" else weight / (ratio + 1.0)
    return per_sample * weight


def sample_flow_timesteps(
    n: int, scheduler, generator, device, density: str = "logit_normal", mean: float = 0.0, std: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Flow-matching (timesteps, sigmas) for ``n`` samples, picked from the training scheduler's own tables
    (``FlowMatchEulerDiscreteScheduler`` at init: ``num_train_timesteps`` entries, its ``shift`` applied).

    ``density``: ``logit_normal`` (u = sigmoid(N(mean, std)), SD3's default: mid-noise levels more often)
    or ``uniform``. ``generator``: a ``torch.Generator`` or a :class:`sdtune.train.data.GlobalDraw`."""
    if density == "logit_normal":
        z = _randn((n,), generator, device, torch.float32)
        u = torch.sigmoid(z * std + mean)
    elif density == "uniform":
        if hasattr(generator, "rand"):
            u = generator.rand(n, device)
        else:  # a torch.Generator draws on its own device (a CUDA one cannot fill a CPU tensor)
            u = torch.rand(n, generator=generator, device=generator.device).to(device)
    else:
        raise ValueError(f"unsupported timestep density {density!r}")
    count = scheduler.config.num_train_timesteps
    index = (u * count).long().clamp(0, count - 1)  # on the device: no copy back to the host
    timesteps, sigmas = _tables_on(scheduler, device)
    return timesteps[index], sigmas[index]


def _tables_on(scheduler, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The scheduler's timestep and sigma tables on ``device``, copied there once (not in every step); copied
    again if the scheduler replaced its tables (``set_timesteps``)."""
    device = torch.device(device)
    source = (scheduler.timesteps, scheduler.sigmas)
    cached = getattr(scheduler, "_sdtune_tables", None)
    if (
        cached is None
        or cached[0][0] is not source[0]
        or cached[0][1] is not source[1]
        or cached[1] != device
    ):
        cached = (source, device, (source[0].to(device), source[1].to(device)))
        scheduler._sdtune_tables = cached
    return cached[2]


def flow_noisy(latents: torch.Tensor, noise: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """The rectified-flow interpolation (1 − σ)·x0 + σ·noise (σ broadcast over the sample's dims)."""
    s = sigmas.reshape(-1, *([1] * (latents.ndim - 1))).to(latents.dtype)
    return (1.0 - s) * latents + s * noise


def flow_target(latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity the transformer predicts: noise − x0 (loss weighting "none": plain MSE against it)."""
    return noise - latents


class Noised(NamedTuple):
    """One training draw: the model's input, its timesteps, and what it should predict."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


class Denoising:
    """The DDPM objective (SD 1.x/2.x/SDXL): epsilon or v-prediction (``train.prediction_type``, default the
    scheduler's), ``train.noise_offset``, min-SNR-γ weighting (``train.snr_gamma``)."""

    def __init__(self, scheduler, tc):
        self.scheduler = scheduler
        self.prediction_type = tc.prediction_type or scheduler.config.prediction_type
        self.snr_gamma, self.noise_offset = tc.snr_gamma, tc.noise_offset

    def add_noise(self, latents: torch.Tensor, generator) -> Noised:
        noise = sample_noise(latents, generator, self.noise_offset)
        t = sample_timesteps(
            latents.shape[0], self.scheduler.config.num_train_timesteps, generator, latents.device
        )
        noisy = self.scheduler.add_noise(latents, noise, t)
        return Noised(noisy, t, prediction_target(self.scheduler, latents, noise, t, self.prediction_type))

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Per-sample loss, shape ``[batch]``."""
        return diffusion_loss(
            pred,
            target,
            timesteps=timesteps,
            scheduler=self.scheduler,
            snr_gamma=self.snr_gamma,
            prediction_type=self.prediction_type,
        )


class FlowMatching:
    """The rectified-flow objective (SD3): σ from the scheduler's tables at an index drawn from
    ``train.timestep_density``; the model predicts the velocity noise − x0; plain MSE."""

    def __init__(self, scheduler, tc):
        self.scheduler = scheduler
        self.density, self.mean, self.std = tc.timestep_density, tc.logit_mean, tc.logit_std

    def add_noise(self, latents: torch.Tensor, generator) -> Noised:
        noise = sample_noise(latents, generator)
        t, sigmas = sample_flow_timesteps(
            latents.shape[0], self.scheduler, generator, latents.device, self.density, self.mean, self.std
        )
        return Noised(flow_noisy(latents, noise, sigmas), t, flow_target(latents, noise))

    def loss(self, pred: torch.Tensor, target: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        return diffusion_loss(pred, target)


def objective_for(cfg, scheduler) -> Denoising | FlowMatching:
    """The objective of the model family of ``cfg`` (:mod:`sdtune.models.families`) over its ``scheduler``."""
    from sdtune.models.families import family_of

    kind = {"denoising": Denoising, "flow_matching": FlowMatching}[family_of(cfg).objective]
    return kind(scheduler, cfg.train)
