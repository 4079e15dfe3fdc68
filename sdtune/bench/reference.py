"""The reference loop: DreamBooth-LoRA the straightforward way, as diffusers' ``train_dreambooth_lora.py`` does it.

Every step encodes the image with the VAE and the caption with the text encoder, and reads the loss back
with ``.item()`` (the example logs it to the progress bar every step). It uses diffusers, transformers and
peft directly (from :mod:`sdtune.train` only the image loader, which runs once before the loop) and matches the real trainer's math:

- the same model folder, training records (``split == "train"``), resolution, captions, seed;
- the same data order (a fresh ``randperm`` per epoch from ``Generator().manual_seed(seed)``);
- the same random draws per step, in the same order, from ``Generator().manual_seed(seed * 1000)``: the VAE
  latent sample, the noise, the timesteps (the example uses the global RNG; one generator makes both loops
  draw identical numbers, so their losses agree up to floating-point rounding);
- the same LoRA (gaussian init, rank/alpha/target modules from the config), AdamW with the config's learning
  rate and weight decay, the same LR schedule, gradient clipping at ``max_grad_norm``;
- MSE on epsilon (or v-prediction), fp32; with ``train.mixed_precision=bf16`` as the example runs it under
  ``--mixed_precision bf16``: the frozen UNet, VAE and text encoder in bf16, the LoRA weights cast back to
  fp32, the UNet's forward under bf16 autocast (what ``accelerator.prepare`` wraps it in).

Images are decoded once and token ids computed once (the example re-reads and re-tokenizes in its dataset
every step): the reference gets the benefit of the doubt on work that is not the model's.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from sdtune.config import RunConfig
from sdtune.manifest import read_manifest
from sdtune.train.data import load_image


@dataclass
class ReferenceLoRA:
    """Set up once with :meth:`build`; each :meth:`step` is one optimizer step and returns the loss (a float)."""

    cfg: RunConfig
    unet: torch.nn.Module
    weight_dtype: torch.dtype
    vae: torch.nn.Module
    text_encoder: torch.nn.Module
    noise_scheduler: object
    pixels: torch.Tensor  # [N, 3, res, res]
    input_ids: torch.Tensor  # [N, 77]
    params: list[torch.nn.Parameter]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    generator: torch.Generator
    order: torch.Generator
    losses: list[float] = field(default_factory=list)
    _queue: list[int] = field(default_factory=list)

    @classmethod
    def build(cls, cfg: RunConfig, data_dir: Path, device: str = "cpu") -> ReferenceLoRA:
        from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
        from diffusers.optimization import get_scheduler
        from peft import LoraConfig
        from transformers import CLIPTextModel, CLIPTokenizer

        if cfg.model.arch not in ("sd15", "sd2"):
            raise ValueError("the reference loop covers SD 1.x/2.x (one text encoder)")
        tc, base = cfg.train, cfg.model.base
        weight_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.mixed_precision, torch.float32)
        torch.manual_seed(tc.seed)
        kw = {"local_files_only": True}
        tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
        noise_scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
        text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw).to(device)
        vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw).to(device)
        unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw).to(device)
        for module in (unet, vae, text_encoder):
            module.requires_grad_(False)
            module.to(dtype=weight_dtype)
        vae.eval()
        text_encoder.eval()

        torch.manual_seed(tc.seed)  # the LoRA init draws from the global RNG
        unet.add_adapter(
            LoraConfig(
                r=tc.rank,
                lora_alpha=tc.alpha or tc.rank,
                init_lora_weights="gaussian",
                target_modules=tc.target_modules,
            )
        )
        params = [p for p in unet.parameters() if p.requires_grad]
        for p in params:  # the example's cast_training_params: trainable weights in fp32
            p.data = p.data.float()
        unet.train()

        records = [r for r in read_manifest(Path(data_dir)) if r.split == "train"]
        res = cfg.preprocess.resolution
        pixels = torch.stack([load_image(Path(data_dir) / r.file, res) for r in records]).to(device)
        captions = [r.caption or cfg.format_prompt(cfg.caption.template) for r in records]
        input_ids = tokenizer(
            captions,
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(device)

        optimizer = torch.optim.AdamW(params, lr=tc.learning_rate, weight_decay=tc.adam_weight_decay)
        lr_scheduler = get_scheduler(
            tc.lr_scheduler, optimizer, num_warmup_steps=tc.lr_warmup_steps, num_training_steps=tc.max_steps
        )
        return cls(
            cfg=cfg,
            unet=unet,
            weight_dtype=weight_dtype,
            vae=vae,
            text_encoder=text_encoder,
            noise_scheduler=noise_scheduler,
            pixels=pixels,
            input_ids=input_ids,
            params=params,
            optimizer=optimizer,
            lr_scheduler=lr_scheduler,
            generator=torch.Generator(device=device).manual_seed(tc.seed * 1000),
            order=torch.Generator().manual_seed(tc.seed),
        )

    def _next_batch(self) -> torch.Tensor:
        bs = self.cfg.train.batch_size
        while len(self._queue) < bs:  # a fresh permutation per epoch
            self._queue.extend(torch.randperm(len(self.pixels), generator=self.order).tolist())
        batch, self._queue = self._queue[:bs], self._queue[bs:]
        return torch.tensor(batch, dtype=torch.long, device=self.pixels.device)

    def step(self) -> float:
        tc, gen = self.cfg.train, self.generator
        idx = self._next_batch()
        # Encode the images to latent space and the captions to embeddings: every step.
        latents = self.vae.encode(self.pixels[idx].to(self.weight_dtype)).latent_dist.sample(generator=gen)
        latents = latents * self.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=gen, device=latents.device, dtype=latents.dtype)
        bsz = latents.shape[0]
        timesteps = torch.randint(
            0, self.noise_scheduler.config.num_train_timesteps, (bsz,), generator=gen, device=latents.device
        )
        noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
        encoder_hidden_states = self.text_encoder(self.input_ids[idx], return_dict=False)[0]

        half = self.weight_dtype != torch.float32
        with torch.autocast(self.pixels.device.type, dtype=self.weight_dtype, enabled=half):
            model_pred = self.unet(noisy_latents, timesteps, encoder_hidden_states, return_dict=False)[0]
        prediction_type = tc.prediction_type or self.noise_scheduler.config.prediction_type
        if prediction_type == "epsilon":
            target = noise
        else:
            target = self.noise_scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(model_pred.float(), target.float(), reduction="mean")

        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, tc.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        value = loss.detach().item()  # the per-step host sync the example does for its progress bar
        self.losses.append(value)
        return value

    def run(self, steps: int) -> list[float]:
        return [self.step() for _ in range(steps)]
