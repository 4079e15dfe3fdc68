"""Checkpoints: atomic, verified, and exact to the bit on resume — shared by every recipe as plain functions.

A checkpoint is a folder ``step-00000120/`` (under ``train.checkpoint_dir``, default ``<out>/checkpoints``;
a local folder or ``s3://bucket/prefix``, same code path) holding:

- ``trainable.safetensors``: the weights that train (LoRA, embeddings or the whole UNet), full (FSDP
  shards are gathered to rank 0 first);
- ``optimizer.pt``: optimizer, LR scheduler, grad scaler and EMA state;
- ``rng.pt``: one entry per rank — python, numpy, torch CPU/CUDA RNG, the recipe's generators and the data
  position (epoch, index into that epoch's order) of each sampler;
- ``meta.json``: global step, world size, attempt counter, the resolved config, the hash of the fields that
  change the math, a fingerprint of the training data, the last logged loss;
- ``manifest.json``: sha256 of every file above, written LAST.

Atomicity. Locally the files go to ``.tmp-step-…`` and are fsynced, then the manifest, then the folder is
renamed (atomic on POSIX) and ``latest`` replaced. On S3 (no rename) every file is uploaded, then the
``COMPLETE`` marker (the manifest), then ``latest``. Old checkpoints are pruned only after that. So a
process killed at any instant leaves either the previous complete checkpoint or a new complete one; a torn
one (no manifest/marker, or a file whose hash does not match) is skipped by ``resume=auto`` and refused
when named explicitly.

Only rank 0 writes (no duplicate uploads); every rank contributes its RNG/data position through one
``all_gather_object``. Resume refuses (exit 2, one line naming what changed) a checkpoint written by another
config, another world size or other data: continuing it would not be the run it claims to be.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sdtune.config import RunConfig
from sdtune.errors import CheckpointError

MANIFEST = "manifest.json"
COMPLETE = "COMPLETE"
LATEST = "latest"
WEIGHTS = "trainable.safetensors"
OPTIM = "optimizer.pt"
RNG = "rng.pt"
META = "meta.json"
PREFIX = "step-"

# Train keys that never change what a step computes: a resumed run may change them freely.
OPERATIONAL_TRAIN_KEYS = frozenset(
    {
        "log_every",
        "checkpoint_every",
        "keep_checkpoints",
        "checkpoint_dir",
        "resume",
        "preempt_grace_s",
        "export_kohya",
        "num_processes",
        "validation_every",
        "validation_inference_steps",
        "export_single_file",
        "compile",  # the same math (to round-off), compiled or not: a run may resume either way
    }
)


@dataclass
class TrainState:
    """Everything a recipe must hand over so a checkpoint can continue it exactly."""

    modules: dict[str, torch.nn.Module]  # unwrapped; parameters with requires_grad are saved
    optimizer: Any
    lr_scheduler: Any
    generators: dict[str, torch.Generator] = field(default_factory=dict)  # this rank's random streams
    samplers: dict[str, Any] = field(default_factory=dict)  # state_dict()/load_state_dict(): data position
    scaler: Any = None
    ema: Any = None
    fsdp: bool = False
    data_fingerprint: str = ""
    attempt: int = 0  # 0 for a fresh run, +1 per resume
    last_loss: float = float("nan")


@dataclass
class Found:
    location: str  # folder or s3:// URI of the checkpoint
    folder: Path  # local copy (the folder itself, or a download)
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.meta["step"])


# ---------------------------------------------------------------------------------------------- identity


def math_fields(cfg: RunConfig) -> dict[str, Any]:
    """The config fields that change what a training step computes, flattened to dotted keys."""
    train = {k: v for k, v in cfg.train.model_dump(mode="json").items() if k not in OPERATIONAL_TRAIN_KEYS}
    if cfg.train.lr_scheduler == "constant":
        train.pop("max_steps")  # a constant schedule does not depend on the length: runs may be extended
    fields = {f"train.{k}": v for k, v in train.items()}
    fields.update({f"model.{k}": getattr(cfg.model, k) for k in ("base", "arch", "revision")})
    fields["preprocess.resolution"] = cfg.preprocess.resolution
    fields.update({f"caption.{k}": getattr(cfg.caption, k) for k in ("trigger", "class_noun", "template")})
    return fields


def config_hash(cfg: RunConfig) -> str:
    return hashlib.sha256(json.dumps(math_fields(cfg), sort_keys=True).encode()).hexdigest()


def data_fingerprint(records) -> str:
    """Hash of the training records (file, content hash, caption) of the whole dataset."""
    items = sorted((r.file, r.sha256, r.caption or "") for r in records)
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()


def checkpoint_root(cfg: RunConfig, out_dir: Path) -> str:
    return cfg.train.checkpoint_dir or str(Path(out_dir) / "checkpoints")


def is_due(cfg: RunConfig, step: int) -> bool:
    every = cfg.train.checkpoint_every
    return bool(every) and step % every == 0 and step < cfg.train.max_steps


def _name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def _is_s3(location: str) -> bool:
    return location.startswith("s3://")


# ------------------------------------------------------------------------------------------------- save


def save(cfg: RunConfig, out_dir: Path, step: int, state: TrainState, accelerator) -> str | None:
    """Write a checkpoint of ``step`` (a collective: every rank calls it). Returns its location on rank 0."""
    from safetensors.torch import save_file

    from .runtime import all_gather_objects

    ranks = all_gather_objects(_rank_state(state))  # every rank's RNG and data position, in rank order
    weights, optim = _full_state(state, accelerator.is_main_process)  # FSDP: gathered to rank 0 (collective)
    location = None
    if accelerator.is_main_process:
        root = checkpoint_root(cfg, out_dir)
        meta = {
            "step": step,
            "world_size": accelerator.num_processes,
            "attempt": state.attempt,
            "config_hash": config_hash(cfg),
            "math_fields": math_fields(cfg),
            "method": cfg.train.method,
            "data_fingerprint": state.data_fingerprint,
            "last_loss": state.last_loss,
            "config": cfg.storable().model_dump(mode="json"),
            "time": time.time(),
            "torch": torch.__version__,
        }
        staging = Path(root) if not _is_s3(root) else Path(tempfile.mkdtemp(prefix="sdtune-ckpt-"))
        staging.mkdir(parents=True, exist_ok=True)
        tmp = staging / f".tmp-{_name(step)}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS))
            torch.save(optim, tmp / OPTIM)
            torch.save(ranks, tmp / RNG)
            (tmp / META).write_text(json.dumps(meta, indent=1, default=str), encoding="utf-8")
            files = {}
            for name in (WEIGHTS, OPTIM, RNG, META):
                _fsync(tmp / name)
                files[name] = _sha256(tmp / name)
            manifest = json.dumps({"step": step, "files": files}, indent=1)
            (tmp / MANIFEST).write_text(manifest, encoding="utf-8")  # last: its presence means "complete"
            _fsync(tmp / MANIFEST)
            location = (
                _commit_s3(tmp, root, step, manifest) if _is_s3(root) else _commit_local(tmp, root, step)
            )
        finally:
            if _is_s3(root):
                shutil.rmtree(staging, ignore_errors=True)
        prune(root, cfg.train.keep_checkpoints)
    accelerator.wait_for_everyone()
    return location


def _commit_local(tmp: Path, root: str, step: int) -> str:
    final = Path(root) / _name(step)
    if final.exists():  # e.g. resume=never over an old run: replace, never mix
        old = final.with_name(f".old-{final.name}-{uuid.uuid4().hex[:8]}")
        final.rename(old)
        shutil.rmtree(old, ignore_errors=True)
    tmp.rename(final)
    _fsync_dir(Path(root))
    pointer = Path(root) / f".{LATEST}.tmp"
    pointer.write_text(final.name + "\n", encoding="utf-8")
    _fsync(pointer)
    os.replace(pointer, Path(root) / LATEST)
    _fsync_dir(Path(root))
    return str(final)


def _commit_s3(tmp: Path, root: str, step: int, manifest: str) -> str:
    client, bucket, prefix = _s3(root)
    key = f"{prefix}{_name(step)}/"
    with _reachable(root):
        for name in (WEIGHTS, OPTIM, RNG, META, MANIFEST):
            client.fput_object(bucket, key + name, str(tmp / name))
        _put_text(client, bucket, key + COMPLETE, manifest)  # after every file: the checkpoint now counts
        _put_text(client, bucket, prefix + LATEST, _name(step) + "\n")
    return f"s3://{bucket}/{key}"


def prune(root: str, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and any torn leftovers (rank 0 only, after
    the new checkpoint is complete)."""
    complete = [step for step, _ in list_complete(root)]  # newest first
    doomed = set(complete[keep:])
    if _is_s3(root):
        client, bucket, prefix = _s3(root)
        with _reachable(root):
            for step in sorted(_s3_steps(client, bucket, prefix)):
                if step in doomed or step not in complete:
                    key = f"{prefix}{_name(step)}/"
                    client.remove_object(bucket, key + COMPLETE)  # first: never a "complete" half-deleted one
                    for obj in client.list_objects(bucket, prefix=key, recursive=True):
                        client.remove_object(bucket, obj.object_name)
        return
    for path in Path(root).iterdir():
        step = _step_of(path.name)
        torn = path.name.startswith((".tmp-", ".old-")) or (
            step is not None and not (path / MANIFEST).is_file()
        )
        if path.is_dir() and (torn or step in doomed):
            shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------------------- resume


def find(cfg: RunConfig, out_dir: Path, world_size: int, fingerprint: str) -> Found | None:
    """The checkpoint to resume from (``train.resume``): None for a fresh start.

    ``auto``: the newest complete checkpoint whose hashes verify (torn ones are skipped with a warning);
    ``never``: None; anything else: that checkpoint, which must verify. Raises :class:`CheckpointError`
    when the checkpoint belongs to another config, world size or dataset.
    """
    mode = cfg.train.resume
    if mode == "never":
        return None
    explicit = mode != "auto"
    candidates = [mode] if explicit else [loc for _, loc in list_complete(checkpoint_root(cfg, out_dir))]
    for location in candidates:
        try:
            folder = fetch(location)
            verify(folder)
        except (OSError, ValueError, CheckpointError) as exc:
            if explicit:
                raise CheckpointError(f"train.resume={location}: not a usable checkpoint ({exc})") from None
            warnings.warn(f"skipping torn checkpoint {location}: {exc}", stacklevel=2)
            continue
        meta = json.loads((folder / META).read_text(encoding="utf-8"))
        check_compatible(meta, cfg, world_size, fingerprint, location)
        return Found(location, folder, meta)
    return None


def check_compatible(meta: dict, cfg: RunConfig, world_size: int, fingerprint: str, location: str) -> None:
    now, then = math_fields(cfg), meta.get("math_fields", {})
    # Only this config's fields count: a checkpoint written when every method carried every option has
    # more train.* keys, which this method does not read.
    changed = sorted(k for k in now if now[k] != then.get(k))
    if meta["config_hash"] != config_hash(cfg) and changed:
        raise CheckpointError(
            f"checkpoint {location} was written by another training config ({', '.join(changed)} "
            "changed); resuming would not continue that run. Start fresh with train.resume=never or another "
            "train.checkpoint_dir"
        )
    if meta["world_size"] != world_size:
        raise CheckpointError(
            f"checkpoint {location} was written by {meta['world_size']} processes, this run has {world_size}: "
            "data shards and per-rank random streams would differ. Resume with the same process count"
        )
    if fingerprint and meta.get("data_fingerprint") and meta["data_fingerprint"] != fingerprint:
        raise CheckpointError(f"checkpoint {location} was trained on other data than {cfg.name}'s input")


def _load_pickled_state(found: Found, name: str) -> Any:
    """``torch.load`` with ``weights_only=True``: a file that needs anything beyond tensors and plain
    containers (a crafted pickle that would run code) is a permanent CheckpointError, not a traceback."""
    import pickle

    try:
        return torch.load(found.folder / name, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(f"checkpoint {found.location}: {name} refused ({first})") from None


def load(found: Found, state: TrainState, accelerator) -> int:
    """Restore ``state`` from ``found`` on this rank; returns the step to continue after."""
    from safetensors.torch import load_file

    weights = load_file(str(found.folder / WEIGHTS))
    optim = _load_pickled_state(found, OPTIM)
    if state.fsdp:
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        options = StateDictOptions(full_state_dict=True)
        ((name, module),) = state.modules.items()
        set_model_state_dict(module, _strip(weights, name), options=options)
        if optim["optimizer"].get("state"):
            set_optimizer_state_dict(module, _raw(state.optimizer), optim["optimizer"], options=options)
        else:  # stateless (SGD): torch's full-state loader needs a state tensor to find the device
            _load_param_groups(_raw(state.optimizer), optim["optimizer"]["param_groups"], found)
    else:
        with torch.no_grad():
            for name, module in state.modules.items():
                mine = {k: p for k, p in module.named_parameters() if p.requires_grad}
                theirs = _strip(weights, name)
                if set(mine) != set(theirs):
                    raise CheckpointError(
                        f"checkpoint {found.location}: trainable weights of {name} do not match"
                    )
                for key, param in mine.items():
                    param.copy_(theirs[key])
        state.optimizer.load_state_dict(optim["optimizer"])
    state.lr_scheduler.load_state_dict(optim["lr_scheduler"])
    if state.scaler is not None and optim.get("scaler"):
        state.scaler.load_state_dict(optim["scaler"])
    if state.ema is not None and optim.get("ema"):
        _load_ema(state.ema, optim["ema"], found)
    ranks = _load_pickled_state(found, RNG)
    _restore_rank_state(ranks[accelerator.process_index], state)
    state.attempt = int(found.meta.get("attempt", 0)) + 1
    state.last_loss = float(found.meta.get("last_loss", float("nan")))
    return found.step


# ----------------------------------------------------------------------------------------- locations


def list_complete(root: str) -> list[tuple[int, str]]:
    """(step, location) of every checkpoint with a manifest / COMPLETE marker, newest first."""
    if _is_s3(root):
        client, bucket, prefix = _s3(root)
        found = []
        with _reachable(root):
            for step in _s3_steps(client, bucket, prefix):
                key = f"{prefix}{_name(step)}/"
                if _s3_exists(client, bucket, key + COMPLETE):
                    found.append((step, f"s3://{bucket}/{key}"))
        return sorted(found, reverse=True)
    path = Path(root)
    if not path.is_dir():
        return []
    found = [(_step_of(p.name), str(p)) for p in path.iterdir() if p.is_dir() and (p / MANIFEST).is_file()]
    return sorted(((s, loc) for s, loc in found if s is not None), reverse=True)


def fetch(location: str) -> Path:
    """A local folder with the checkpoint's files (S3: downloaded to a per-process temp folder)."""
    if not _is_s3(location):
        folder = Path(location)
        if not folder.is_dir():
            raise CheckpointError(f"{location} is not a folder")
        return folder
    client, bucket, key = _s3(location)
    with _reachable(location):
        if not _s3_exists(client, bucket, key + COMPLETE):
            raise CheckpointError("no COMPLETE marker")
        local = Path(tempfile.mkdtemp(prefix="sdtune-resume-"))
        for name in (MANIFEST, WEIGHTS, OPTIM, RNG, META):
            client.fget_object(bucket, key + name, str(local / name))
    return local


def verify(folder: Path) -> dict:
    """The manifest, after checking every listed file's sha256."""
    manifest_path = folder / MANIFEST
    if not manifest_path.is_file():
        raise CheckpointError("no manifest (the write did not finish)")
    manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    for name, digest in manifest["files"].items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{name} is missing")
        if _sha256(path) != digest:
            raise CheckpointError(f"{name} does not match its sha256 (damaged)")
    return manifest


# --------------------------------------------------------------------------------------------- helpers


def _rank_state(state: TrainState) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "generators": {k: g.get_state() for k, g in state.generators.items()},
        "samplers": {k: s.state_dict() for k, s in state.samplers.items()},
    }


def _restore_rank_state(saved: dict[str, Any], state: TrainState) -> None:
    random.setstate(saved["python"])
    kind, keys, pos, has_gauss, cached = saved["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(saved["torch"])
    if saved["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["cuda"])
    for key, gen in state.generators.items():
        gen.set_state(saved["generators"][key])
    for key, sampler in state.samplers.items():
        sampler.load_state_dict(saved["samplers"][key])


def _full_state(state: TrainState, keep: bool) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    extra = {
        "lr_scheduler": state.lr_scheduler.state_dict(),
        "scaler": state.scaler.state_dict() if state.scaler is not None else None,
        "ema": _ema_state(state.ema, keep) if state.ema is not None else None,
    }
    if state.fsdp:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        ((name, module),) = state.modules.items()
        options = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd, optim_sd = get_state_dict(module, _raw(state.optimizer), options=options)
        return {f"{name}.{k}": v for k, v in model_sd.items()}, {"optimizer": optim_sd, **extra}
    weights = {
        f"{name}.{k}": p.detach().to("cpu", copy=True)
        for name, module in state.modules.items()
        for k, p in module.named_parameters()
        if p.requires_grad
    }
    return weights, {"optimizer": state.optimizer.state_dict(), **extra}


def _load_param_groups(optimizer, saved: list[dict[str, Any]], found: Found) -> None:
    """The settings of each param group (learning rate …), for an optimizer that keeps no state."""
    if len(saved) != len(optimizer.param_groups):
        raise CheckpointError(f"checkpoint {found.location}: optimizer param groups do not match")
    for group, then in zip(optimizer.param_groups, saved, strict=True):
        group.update({k: v for k, v in then.items() if k != "params"})


def _ema_state(ema, keep: bool) -> dict[str, Any]:
    """diffusers ``EMAModel`` state with whole averaged weights: under FSDP each rank averages only its own
    shards, gathered here like the model's (a collective), so the file does not depend on the world size."""
    from .parallel import full_tensors

    return {**ema.state_dict(), "shadow_params": full_tensors(ema.shadow_params, keep)}


def _load_ema(ema, saved: dict[str, Any], found: Found) -> None:
    """Restore the EMA in place: its scalars, then the averaged weights copied into the tensors it already
    holds, so each keeps its device and, under FSDP, its shard (this rank's slice of the whole weight)."""
    from .parallel import load_full_tensors

    scalars = {k: v for k, v in saved.items() if k != "shadow_params"}
    ema.load_state_dict(scalars)
    try:
        load_full_tensors(ema.shadow_params, saved["shadow_params"])
    except (KeyError, ValueError, RuntimeError) as exc:
        raise CheckpointError(
            f"checkpoint {found.location}: EMA weights do not match the model ({exc})"
        ) from None


def _raw(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer wraps the torch one


def _strip(weights: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    return {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(name + ".")}


def _step_of(name: str) -> int | None:
    if name.startswith(PREFIX) and name[len(PREFIX) :].isdigit():
        return int(name[len(PREFIX) :])
    return None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as fh:
        os.fsync(fh.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _s3(uri: str):
    from sdtune.data.s3 import client_from_env, split_s3_uri

    bucket, prefix = split_s3_uri(uri)
    return client_from_env(), bucket, (prefix.rstrip("/") + "/" if prefix else "")


def _reachable(location: str):
    """An unreachable S3 ends the run with one line and exit 4 (a retry may find it back), not urllib3's
    traceback."""
    from sdtune.data.s3 import unreachable_is_service_error

    return unreachable_is_service_error(f"checkpoint {location}")


def _s3_steps(client, bucket: str, prefix: str) -> list[int]:
    steps = []
    for obj in client.list_objects(bucket, prefix=prefix, recursive=False):
        step = _step_of(obj.object_name[len(prefix) :].rstrip("/"))
        if step is not None:
            steps.append(step)
    return steps


def _s3_exists(client, bucket: str, key: str) -> bool:
    from minio.error import S3Error

    try:
        client.stat_object(bucket, key)
        return True
    except S3Error:
        return False


def _put_text(client, bucket: str, key: str, text: str) -> None:
    data = text.encode("utf-8")
    client.put_object(bucket, key, io.BytesIO(data), len(data))


def end_of_step(
    step: int, cfg: RunConfig, out_dir: Path, state: TrainState, accelerator, tracker, watch
) -> None:
    """Called by every rank after each optimizer step: checkpoint when due, or when any rank got SIGTERM —
    then also stop with :class:`~sdtune.errors.Preempted` (exit 75, retryable)."""
    from sdtune.errors import Preempted

    stop = watch.should_stop()
    if not (stop or is_due(cfg, step)):
        return
    tracker.check()  # a diverged state is never saved
    state.last_loss = tracker.last_loss
    location = save(cfg, out_dir, step, state, accelerator)
    if stop:
        raise Preempted(
            f"SIGTERM: stopped after step {step}, checkpoint {location or '(rank 0)'} written "
            f"{watch.seconds_since_signal():.1f}s after the signal; run again to resume"
        )
