"""The planner: parameter counts of the real architectures (no weights), memory against measured peaks on
CPU, the fit/advice logic and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdtune.config import config_from_dict
from sdtune.train import plan as P

TINY = {
    "block_out_channels": [32, 64],
    "layers_per_block": 1,
    "cross_attention_dim": 32,
    "sample_size": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
    "attention_head_dim": 8,
}
MEDIUM = {
    "block_out_channels": [32, 64, 128, 128],
    "layers_per_block": 2,
    "cross_attention_dim": 128,
    "sample_size": 32,
    "attention_head_dim": 8,
}
TOLERANCE = 0.25  # planner's backward peak (gradients + activations) vs measured peak RSS rise on CPU


def test_parameter_counts_of_the_real_models_without_weights():
    sd15 = P.estimate(
        config_from_dict(
            {"model": {"base": "stable-diffusion-v1-5/stable-diffusion-v1-5"}, "train": {"rank": 4}}
        )
    )
    assert round(sd15.params_unet / 1e6, 1) == 859.5 and round(sd15.params_text_encoders / 1e6, 1) == 123.1
    assert sd15.params_trainable == 199_296 * 4  # docs/methods.md: LoRA = 199,296 × rank on SD 1.5


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "unet", "method", "batch", "gc"),
    [
        ("tiny", TINY, "lora", 4, False),
        ("tiny", TINY, "dreambooth", 4, False),
        ("medium", MEDIUM, "lora", 1, False),
        ("medium", MEDIUM, "dreambooth", 1, False),
        ("medium", MEDIUM, "dreambooth", 1, True),
    ],
)
def test_memory_estimate_matches_measured_peak_on_cpu(name, unet, method, batch, gc):
    spec = {"unet": unet, "resolution": 256, "batch": batch, "method": method, "gc": gc}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("measure_memory.py")), json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    got = json.loads(out.stdout.strip().splitlines()[-1])
    ratio = got["estimate"] / got["measured"]
    assert abs(ratio - 1) <= TOLERANCE, f"{name} {method} gc={gc}: estimate/measured = {ratio:.2f} ({got})"
