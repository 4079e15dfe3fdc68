"""Real multi-process runs on CPU (gloo through torchrun): DDP equivalence, FSDP2 full fine-tune with a
sharded checkpoint and resume, SIGTERM through launch_training."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdtune.cli import main
from sdtune.errors import EXIT_PREEMPTED
from sdtune.train import checkpoint as C
from sdtune.train.launch import launch_training
from tests.train.conftest import make_stage, write_config

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def one_record(tmp_path_factory):
    """One training image: both ranks (shards wrap around) and a batch of 2 see exactly the same samples."""
    return make_stage(tmp_path_factory.mktemp("one") / "stage", n=2, holdout=1)


def test_ddp_two_ranks_equal_one_rank_double_batch(tmp_path, tiny_sd15, one_record):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "optimizer": "sgd",
            "learning_rate": 0.5,
            "max_steps": 3,
            "log_every": 3,
            "checkpoint_every": 0,
            "adam_weight_decay": 0.0,
        },
    )
    single = tmp_path / "single"
    assert (
        main(
            [
                "train",
                "--config",
                str(config),
                "--data",
                str(one_record),
                "--out",
                str(single),
                "train.batch_size=2",
            ]
        )
        == 0
    )
    ddp = tmp_path / "ddp"
    assert launch_training(config, one_record, ddp, 2, None, ["train.batch_size=1"]) == 0

    a = load_file(str(single / "pytorch_lora_weights.safetensors"))
    b = load_file(str(ddp / "pytorch_lora_weights.safetensors"))
    assert a.keys() == b.keys()
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"2 ranks x batch 1 vs 1 rank x batch 2: max |diff| {worst:.2e}"
    summary = json.loads((ddp / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["extra"]["replicas_identical"] is True


def test_fsdp_full_finetune_saves_loadable_model_and_resumes_exactly(tmp_path, tiny_sd15, stage_dir):
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "method": "dreambooth",
            "parallelism": "fsdp",
            "with_prior_preservation": False,
            "max_steps": 3,
            "learning_rate": 1e-3,
            "log_every": 1,
            "checkpoint_every": 2,
            "gradient_accumulation_steps": 2,
            "gradient_checkpointing": True,
        },
    )
    out = tmp_path / "fsdp"
    assert launch_training(config, stage_dir, out, 2, None) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["extra"]["parallelism"] == "fsdp" and summary["num_processes"] == 2

    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    base = UNet2DConditionModel.from_pretrained(tiny_sd15, subfolder="unet", local_files_only=True)
    moved = max(
        float((p - q).detach().abs().max())
        for p, q in zip(pipe.unet.parameters(), base.parameters(), strict=True)
    )
    assert moved > 0, "the full UNet trained"

    # The sharded state was gathered into one checkpoint; resuming it on 2 ranks gives the same model.
    ckpt = C.list_complete(str(out / "checkpoints"))[0][1]
    resumed = tmp_path / "resumed"
    assert launch_training(config, stage_dir, resumed, 2, None, [f"train.resume={ckpt}"]) == 0
    assert json.loads((resumed / "train_summary.json").read_text())["extra"]["resumed_from_step"] == 2
    a = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    b = load_file(str(resumed / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_fsdp_ema_equals_single_process_ema_and_resumes_exactly(tmp_path, tiny_sd15, one_record):
    """EMA over FSDP shards: 2 ranks x batch 1 save the same averaged UNet as 1 process x batch 2 (SGD: no
    Adam round-off amplification), the checkpoint holds the whole EMA, and resuming it is exact."""
    config = write_config(
        tmp_path / "c.yaml",
        tiny_sd15,
        train={
            "method": "full",
            "parallelism": "fsdp",
            "use_ema": True,
            "ema_decay": 0.9,
            "optimizer": "sgd",
            "learning_rate": 0.5,
            "adam_weight_decay": 0.0,
            "max_steps": 3,
            "log_every": 3,
            "checkpoint_every": 2,
        },
    )
    fsdp = tmp_path / "fsdp"
    assert launch_training(config, one_record, fsdp, 2, None, ["train.batch_size=1"]) == 0
    summary = json.loads((fsdp / "train_summary.json").read_text())
    assert summary["extra"]["parallelism"] == "fsdp" and summary["extra"]["ema"]
    single = tmp_path / "single"
    args = ["train", "--config", str(config), "--data", str(one_record), "--out", str(single)]
    assert main([*args, "train.batch_size=2"]) == 0

    def worst(a, b):
        assert a.keys() == b.keys()
        return max(float((a[k] - b[k]).abs().max()) for k in a)

    from diffusers import UNet2DConditionModel

    loaded = UNet2DConditionModel.from_pretrained(fsdp, subfolder="unet", local_files_only=True)
    unet = "unet/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(single / unet)), loaded.state_dict()
    assert worst(a, b) < 1e-6, f"saved EMA UNet, FSDP vs 1 process: max |diff| {worst(a, b):.2e}"

    # The step-2 checkpoints: the whole EMA (gathered from the shards), equal to the single process's, and
    # not the raw weights (which it would be, were the averaged shards lost).
    ckpt = C.list_complete(str(fsdp / "checkpoints"))[0][1]
    one = C.list_complete(str(single / "checkpoints"))[0][1]
    ema = [torch.load(C.fetch(loc) / C.OPTIM, weights_only=True)["ema"] for loc in (one, ckpt)]
    assert ema[0]["optimization_step"] == ema[1]["optimization_step"] == 2
    shadow = [dict(enumerate(e["shadow_params"])) for e in ema]
    assert worst(*shadow) < 1e-6, f"checkpointed EMA, FSDP vs 1 process: max |diff| {worst(*shadow):.2e}"
    raw = load_file(str(C.fetch(ckpt) / C.WEIGHTS))
    raw = dict(enumerate(raw[f"unet.{name}"] for name, _ in loaded.named_parameters()))
    assert worst(shadow[1], raw) > 1e-4, "the checkpointed EMA is the raw weights"

    # Resuming the sharded EMA from that checkpoint on 2 ranks saves the same model, bit for bit.
    resumed = tmp_path / "resumed"
    overrides = ["train.batch_size=1", f"train.resume={ckpt}"]
    assert launch_training(config, one_record, resumed, 2, None, overrides) == 0
    assert json.loads((resumed / "train_summary.json").read_text())["extra"]["resumed_from_step"] == 2
    assert (resumed / unet).read_bytes() == (fsdp / unet).read_bytes()


def _sharded_ema_rank(rank: int, world: int, folder: str) -> None:
    """One rank of :func:`test_ema_of_fsdp_shards_holds_only_this_ranks_slice_and_round_trips_exactly`."""
    from diffusers.training_utils import EMAModel
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor

    from sdtune.train import parallel as P

    torch.distributed.init_process_group(
        "gloo", init_method=f"file://{folder}/rdzv", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    model = fully_shard(torch.nn.Sequential(torch.nn.Linear(8, 6), torch.nn.Linear(6, 3)))
    params = list(model.parameters())
    ema = EMAModel(params, decay=0.5)  # as the full recipe builds it, from the sharded parameters
    for _ in range(3):
        with torch.no_grad():
            for p in params:
                p.mul_(1.5).add_(0.1)
        ema.step(params)
    whole = P.full_tensors(ema.shadow_params, keep=True)
    fresh = EMAModel(params, decay=0.5)  # starts from the raw weights, which the average lags behind

    def same() -> bool:
        pairs = zip(ema.shadow_params, fresh.shadow_params, strict=True)
        return all(torch.equal(a.to_local(), b.to_local()) for a, b in pairs)

    before = same()
    P.load_full_tensors(fresh.shadow_params, whole)
    result = {
        "sharded": all(isinstance(s, DTensor) for s in ema.shadow_params),
        "local": sum(s.to_local().numel() for s in ema.shadow_params),
        "total": sum(s.numel() for s in ema.shadow_params),
        "whole": [t.tolist() for t in whole],
        "round_trip": not before and same(),
    }
    (Path(folder) / f"rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.destroy_process_group()


def test_ema_of_fsdp_shards_holds_only_this_ranks_slice_and_round_trips_exactly(tmp_path):
    """diffusers' EMAModel over FSDP2 parameters keeps DTensor shards (about 1/2 of the elements on each of
    2 ranks, never a whole copy); gathering it whole and loading it back gives each rank its slice, bit for bit."""
    import diffusers.training_utils  # noqa: F401  (imported once here: the forked ranks inherit it)
    import torch.distributed.fsdp  # noqa: F401

    torch.multiprocessing.start_processes(
        _sharded_ema_rank, args=(2, str(tmp_path)), nprocs=2, start_method="fork"
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    total = 8 * 6 + 6 + 6 * 3 + 3
    for r in ranks:
        assert r["sharded"] and r["total"] == total and r["round_trip"]
    assert sum(r["local"] for r in ranks) == total and max(r["local"] for r in ranks) < total
    assert ranks[0]["whole"] == ranks[1]["whole"], "every rank gathers the same whole EMA"


def test_sigterm_through_launch_training_checkpoints_and_exits_75(tmp_path, tiny_config, stage_dir):
    """Pod eviction: SIGTERM to the launching process → forwarded to torchrun → both ranks agree on the
    step, rank 0 writes the checkpoint → 75."""
    out = tmp_path / "o"
    overrides = ["train.max_steps=400", "train.log_every=1", "train.checkpoint_every=0"]

    def evict():
        metrics = out / "metrics.jsonl"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
                os.kill(os.getpid(), signal.SIGTERM)
                return
            time.sleep(0.02)

    threading.Thread(target=evict, daemon=True).start()
    assert launch_training(tiny_config, stage_dir, out, 2, None, overrides) == EXIT_PREEMPTED
    (step, location), *_ = C.list_complete(str(out / "checkpoints"))
    assert step >= 3
    meta = json.loads((C.fetch(location) / C.META).read_text())
    assert meta["world_size"] == 2
    assert (
        len(torch.load(C.fetch(location) / C.RNG, weights_only=True)) == 2
    )  # both ranks' RNG and data position
    # (resuming from it, bit for bit, is test_checkpoint.py's kill/resume test; on 2 ranks, the FSDP test's)


def test_fsdp_compiled_run_equals_eager(tmp_path, tiny_sd15, one_record, monkeypatch):
    """``train.compile`` under FSDP compiles each sharded unit's forward (FSDP2's hooks stay eager: traced,
    they are a graph break ``fullgraph`` refuses) and saves the UNet the eager run saves. The backend here is
    ``aot_eager`` (the same capture as inductor without its code generation); inductor measured 1.2e-7."""
    monkeypatch.setenv("SDTUNE_COMPILE_BACKEND", "aot_eager")
    train = {"method": "full", "parallelism": "fsdp", "optimizer": "sgd", "learning_rate": 0.5}
    unets = {}
    for mode in ("none", "default"):
        config = write_config(tmp_path / f"{mode}.yaml", tiny_sd15, train={**train, "compile": mode})
        out = tmp_path / mode
        assert (
            launch_training(config, one_record, out, 2, None, ["train.batch_size=1", "train.max_steps=3"])
            == 0
        )
        unets[mode] = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    base = load_file(str(tiny_sd15 / "unet" / "diffusion_pytorch_model.safetensors"))
    assert max(float((unets["none"][k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained
    worst = max(float((unets["none"][k] - unets["default"][k]).abs().max()) for k in base)
    assert worst < 1e-6, f"compiled vs eager under FSDP: max |diff| {worst:.2e}"


def test_fsdp_sd3_full_finetune_equals_one_process(tmp_path, tiny_sd3, one_record):
    """SD3's transformer under FSDP (each joint block a unit): 2 ranks x batch 1 save the transformer that 1
    process x batch 2 saves (SGD), and it loads into StableDiffusion3Pipeline."""
    from diffusers import StableDiffusion3Pipeline

    train = {"method": "full", "parallelism": "fsdp", "optimizer": "sgd", "learning_rate": 0.5}
    config = write_config(
        tmp_path / "c.yaml", tiny_sd3, model={"arch": "sd3"}, train={**train, "max_steps": 3}
    )
    fsdp, single = tmp_path / "fsdp", tmp_path / "single"
    assert launch_training(config, one_record, fsdp, 2, None, ["train.batch_size=1"]) == 0
    assert json.loads((fsdp / "train_summary.json").read_text())["extra"]["parallelism"] == "fsdp"
    args = ["train", "--config", str(config), "--data", str(one_record), "--out", str(single)]
    assert main([*args, "train.batch_size=2"]) == 0
    weights = "transformer/diffusion_pytorch_model.safetensors"
    a, b = load_file(str(single / weights)), load_file(str(fsdp / weights))
    base = load_file(str(tiny_sd3 / weights))
    assert max(float((a[k] - base[k]).abs().max()) for k in base) > 1e-3  # it trained
    worst = max(float((a[k] - b[k]).abs().max()) for k in a)
    assert worst < 1e-6, f"SD3 transformer, FSDP vs 1 process: max |diff| {worst:.2e}"
    assert StableDiffusion3Pipeline.from_pretrained(fsdp, local_files_only=True).transformer is not None
