"""Measure the peak memory of one UNet training step on CPU (run as a script in a fresh process).

Prints JSON: the peak RSS rise during a steady-state step (forward, backward, optimizer step; weights and
optimizer state already resident) and the planner's matching terms, gradients + activations. glibc is told to serve every allocation ≥ 64 KiB with mmap
(``MALLOC_MMAP_THRESHOLD_``, set by the caller), so freed tensors leave RSS and the high-water mark
(``VmHWM``, reset through ``/proc/self/clear_refs``) is the step's own peak.
"""

from __future__ import annotations

import json
import sys

import torch


def vm(key: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(key)


def main() -> None:
    spec = json.loads(sys.argv[1])
    torch.set_num_threads(1)
    from diffusers import UNet2DConditionModel

    from sdtune.config import config_from_dict
    from sdtune.train import plan as P

    unet_cfg = spec["unet"]
    res, batch, method, gc = spec["resolution"], spec["batch"], spec["method"], spec["gc"]
    torch.manual_seed(0)
    unet = UNet2DConditionModel.from_config(unet_cfg)
    cfg = config_from_dict({"train": {"method": method, **({"rank": 4} if method == "lora" else {})}})
    if method == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=cfg.train.target_modules))
    else:
        unet.requires_grad_(True)
    if gc:
        unet.enable_gradient_checkpointing()
    unet.train()
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    latent = res // 8
    x = torch.randn(batch, unet.config.in_channels, latent, latent)
    t = torch.randint(0, 1000, (batch,))
    ctx = torch.randn(batch, 77, unet.config.cross_attention_dim)

    def step() -> None:
        loss = torch.nn.functional.mse_loss(unet(x, t, encoder_hidden_states=ctx).sample, torch.randn_like(x))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()  # the first step creates the optimizer state: from then on it is resident, like the weights
    base = vm("VmRSS")
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # reset VmHWM to the current RSS
    step()
    measured = vm("VmHWM") - base

    prof = P.profile_forward(unet_cfg, res, batch, lora=cfg if method == "lora" else None)
    trainable = sum(p.numel() for p in params)
    saved = prof.boundary_bytes + prof.max_block_bytes if gc else prof.saved_bytes
    estimate = P.backward_peak(saved * P.ACTIVATION_FACTOR, 4 * trainable)  # the planner's backward peak
    print(json.dumps({"measured": measured, "estimate": estimate, "saved": saved, "trainable": trainable}))


if __name__ == "__main__":
    main()
