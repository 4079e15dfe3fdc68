"""The training session: everything a method shares, so a recipe holds only its model and its loss.

A recipe reads top to bottom::

    with Session(cfg, data_dir, out_dir, logger) as session:       # processes, data shard, resume, logging
        parts = load_components(cfg)                                # its trainable pieces …
        unet = …
        session.start({"unet": unet}, params, desc="lora r4")       # optimizer, schedule, checkpoint state
        for idx in session.steps():                                 # one micro-batch (indices into the shard)
            loss = …                                                # the method's own objective, in view
            session.backward(loss)
        return session.finish("lora", lambda out: save_lora(…, out, cfg))  # rank 0: files, summary, card

What the session owns, in order of a run:

- **Processes**: the Accelerator (one process, ``torchrun`` or ``accelerate launch``: gloo on CPU, NCCL on
  GPUs); only rank 0 logs and writes. Frozen weights' dtype (:attr:`dtype`).
  Gradient checkpointing as ``train.gradient_checkpointing`` resolves on this device (:attr:`checkpointing`:
  ``auto`` asks the planner whether the run fits the card without it; recorded in the train summary).
- **Data**: the ``train`` records (:attr:`all_records`), this rank's share (:attr:`records`), the seeded
  resumable sampler over it and the global-batch random draw (:attr:`draw`, see :class:`.data.GlobalDraw`).
- **Resume and preemption**: the checkpoint to continue is found before any work (a refusal comes early);
  :meth:`start` restores it; after every step a checkpoint is written when due, or on SIGTERM (then exit 75).
- **The step**: :meth:`steps` runs ``gradient_accumulation_steps`` micro-batches per optimizer step (no
  gradient sync but on the last one; autocast around each); :meth:`backward` scales the loss and keeps it on
  the device; then gradients averaged by hand where asked, clipped, optimizer and LR schedule stepped, EMA
  updated, the recipe's ``after_step`` hook (e.g. embedding-row protection).
- **Bookkeeping**: loss, lr and grad norm every ``train.log_every`` steps (the loop's one host sync), extra
  metrics from the recipe, validation grids every ``train.validation_every`` steps.
- **The end**: :meth:`finish` builds the :class:`~.outputs.TrainResult`, lets rank 0 write the method's files
  and the run files (``config.yaml``, ``train_summary.json``, ``README.md``); leaving the ``with`` closes the
  logger and the SIGTERM watch and, on success, the process group.

- **Compilation** (``train.compile``, :mod:`.compile`): the denoiser (``unet``/``transformer``) given to
  :meth:`start` or :meth:`place`, and the text encoders given to :meth:`start` (they run in every step:
  textual inversion, pivotal tuning, a trained encoder), are compiled in place, whole, per repeated block,
  or as CUDA graphs. The step
  around it has no host sync: batch indices copied asynchronously from pinned memory (CUDA), noise and
  timesteps drawn on the device, the loss kept on the device until a log step, the fused AdamW on CUDA.

A change to the loop is made here once, for every method.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

from sdtune.config import RunConfig
from sdtune.tracking import MetricLogger

from . import checkpoint as C
from . import compile as K
from . import data as D
from . import parallel as P
from .outputs import TrainResult, write_run_files
from .plan import checkpointing_for_device
from .runtime import (
    LossTracker,
    PreemptWatch,
    make_accelerator,
    make_optimizer,
    open_logger,
    progress,
    replicas_identical,
    report_step,
    shutdown,
    weight_dtype,
)

DENOISERS = frozenset({"unet", "transformer"})  # checkpoint names of the denoiser


def compiled_in_step(name: str) -> bool:
    """Whether ``train.compile`` applies to the model :meth:`Session.start` gets under checkpoint ``name``: the
    denoiser, and text encoders (``text_encoder``, ``text_encoder_2``, ``text_encoder_0`` …), which are given
    to it only when they run in every step."""
    return name in DENOISERS or name.startswith("text_encoder")


class Session:
    """One training run of one process. Use it as a context manager (see the module docstring)."""

    def __init__(self, cfg: RunConfig, data_dir: Path, out_dir: Path, logger: MetricLogger | None = None):
        self.cfg, self.tc = cfg, cfg.train
        self.data_dir, self.out_dir = Path(data_dir), Path(out_dir)
        self.accelerator = acc = make_accelerator(self.tc)
        self.device, self.rank, self.world = acc.device, acc.process_index, acc.num_processes
        K.check_mode(self.tc.compile, self.device)  # before any work: graphs on a CPU is refused here
        self.is_main = acc.is_main_process
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.all_records = D.train_records(cfg, self.data_dir)
        self.fingerprint = C.data_fingerprint(self.all_records)
        self.found = C.find(cfg, self.out_dir, self.world, self.fingerprint)  # before any work: refuse early
        self.log = open_logger(acc, self.out_dir, logger, resume_step=self.found.step if self.found else 0)
        torch.manual_seed(self.tc.seed)
        self.watch = PreemptWatch(acc, self.tc.preempt_grace_s)
        self.dtype = weight_dtype(acc)
        self.records = D.shard(self.all_records, self.rank, self.world)
        # train.gradient_checkpointing=auto asks the planner whether the run fits this card without it.
        self.checkpointing = checkpointing_for_device(cfg, self.device, self.world, len(self.all_records))
        if self.is_main:
            print(f"gradient checkpointing: {self.checkpointing.describe()}", file=sys.stderr, flush=True)
        self.validator = None
        self.fsdp = False
        self.step = 0
        self._extra_trackers: dict[str, LossTracker] = {}
        self._loop: Iterator | None = None

    # ------------------------------------------------------------------------------------------ lifetime

    def __enter__(self) -> Session:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._loop is not None:
            self._loop.close()  # leaves the micro-batch's autocast/no-sync contexts if the body raised
        self.watch.close()
        if self.log is not None:
            self.log.close()
        if exc_type is None:
            shutdown(self.accelerator)

    # --------------------------------------------------------------------------------------------- setup

    def trainable_unet(self, unet: torch.nn.Module) -> torch.nn.Module:
        """A full fine-tune's denoiser (the UNet; SD3: the transformer): fp32 master weights on the device (autocast does the half-precision maths),
        every weight trains; sharded with FSDP2 (:mod:`.parallel`) under ``train.parallelism=fsdp`` with more
        than one process — before the optimizer is built, so its parameters become this rank's shards."""
        unet.to(self.device)
        unet.requires_grad_(True)
        if self.checkpointing.enabled:
            unet.enable_gradient_checkpointing()
        self.fsdp = self.tc.parallelism == "fsdp" and self.world > 1
        if self.fsdp:
            P.apply_fsdp(unet)
        return unet

    def place(self, model: torch.nn.Module) -> torch.nn.Module:
        """A frozen base (under adapters or new embeddings) on the training device: its weights in
        :attr:`dtype` (half precision under mixed precision), gradient checkpointing and ``train.compile`` as
        configured (:mod:`.compile`). A full fine-tune keeps fp32 master weights: :meth:`trainable_unet`."""
        model.to(self.device)
        if self.dtype != torch.float32:
            model.to(self.dtype)
        if self.checkpointing.enabled:
            model.enable_gradient_checkpointing()
        return K.compile_in_place(model, self.tc.compile)

    def start(
        self,
        models: dict[str, torch.nn.Module],
        params: list[torch.nn.Parameter],
        *,
        desc: str,
        groups: list | None = None,
        prepare: list[str] | None = None,
        ema=None,
        samplers: dict[str, Any] | None = None,
        sampler: str = "data",
        average_grads: list[torch.nn.Parameter] | None = None,
        after_step: Callable[[], None] | None = None,
        metrics: Callable[[], dict[str, float]] | None = None,
        validate: bool = True,
        validation_inputs: dict | None = None,
    ) -> dict[str, torch.nn.Module]:
        """Optimizer, LR schedule and checkpoint state for ``models`` (name → module; the names key the
        checkpoint and the validation pipeline's components); restores the checkpoint found, if any.

        ``params``: what is clipped (``groups``: optimizer param groups, default one group of ``params``).
        ``prepare``: names of the models wrapped for DDP (default all; none under FSDP: already sharded).
        ``average_grads``: trainable parameters of unwrapped models, averaged over ranks by hand.
        ``samplers``: extra resumable samplers (``sampler`` names the main one in the checkpoint).
        ``after_step``: runs after each optimizer step; ``metrics``: extra values for each log row.
        Returns the models, wrapped where prepared."""
        tc, acc = self.tc, self.accelerator
        from diffusers.optimization import get_scheduler

        self.optimizer = make_optimizer(tc, groups or params)
        self.lr_scheduler = get_scheduler(
            tc.lr_scheduler,
            self.optimizer,
            num_warmup_steps=tc.lr_warmup_steps,
            num_training_steps=tc.max_steps,
        )
        for name in filter(compiled_in_step, models):  # compiled in place, before any wrapper (DDP)
            K.compile_in_place(models[name], tc.compile)
        fsdp = self.fsdp
        wrap = [] if fsdp else list(models if prepare is None else prepare)
        if wrap:
            *wrapped, self.optimizer = acc.prepare(*[models[k] for k in wrap], self.optimizer)
            models = {**models, **dict(zip(wrap, wrapped, strict=True))}
        for model in models.values():
            model.train()
        self.models, self.wrapped, self.ema = models, [models[k] for k in wrap], ema
        self.params, self.average_grads = params, average_grads or []
        self.after_step, self.metrics = after_step, metrics
        if fsdp:
            self.wrapped = list(models.values())  # the sharded model: its no-sync and clipping are FSDP's
        if validate:  # FSDP forwards are collectives: every rank samples
            from .validation import Validator

            self.validator = Validator(
                self.cfg, self.out_dir, self.log, acc, all_ranks=fsdp, **(validation_inputs or {})
            )

        # Every rank draws the randomness of the global batch (same seed) and keeps its slice.
        noise = torch.Generator(device=self.device).manual_seed(tc.seed * 1000)
        self.draw = D.GlobalDraw(noise, self.rank, self.world)
        self.batches = D.EpochSampler(len(self.records), tc.batch_size, tc.seed + self.rank)
        self.state = C.TrainState(
            modules=self.plain_models(),
            optimizer=self.optimizer,
            lr_scheduler=self.lr_scheduler,
            generators={"noise": noise},
            samplers={sampler: self.batches, **(samplers or {})},
            scaler=acc.scaler,
            ema=ema,
            fsdp=fsdp,
            data_fingerprint=self.fingerprint,
        )
        self.start_step = C.load(self.found, self.state, acc) if self.found else 0
        self.tracker = LossTracker(acc, names=[r.file for r in self.records])
        self.tracker.last_loss = self.state.last_loss
        self.bar = progress(acc, tc.max_steps, desc)
        self.bar.update(self.start_step)
        return models

    def plain_models(self) -> dict[str, torch.nn.Module]:
        """The models without their DDP wrapper (FSDP modules stay as they are: they are the model)."""
        unwrap = self.accelerator.unwrap_model
        return {k: m if self.fsdp else unwrap(m) for k, m in self.models.items()}

    # ---------------------------------------------------------------------------------------------- loop

    def steps(self, index_on_device: bool = True) -> Iterator[torch.Tensor]:
        """Indices into :attr:`records` of each micro-batch, ``gradient_accumulation_steps`` per optimizer
        step; the body runs under autocast and, but on the last micro-batch, without gradient sync.
        ``index_on_device=False``: the indices stay on the host (for a cache read from disk)."""
        self._loop = self._steps(index_on_device)
        return self._loop

    def _steps(self, index_on_device: bool) -> Iterator[torch.Tensor]:
        tc, acc = self.tc, self.accelerator
        accumulate = tc.gradient_accumulation_steps
        started = time.perf_counter()
        for step in range(self.start_step + 1, tc.max_steps + 1):
            self.step = step
            K.begin_step(tc.compile)
            for micro in range(accumulate):
                idx = next(self.batches)
                self._idx = D.to_device(idx, self.device)  # pinned and asynchronous on CUDA
                last = micro == accumulate - 1
                with contextlib.ExitStack() as stack:
                    for model in self.wrapped:
                        stack.enter_context(P.maybe_no_sync(model, acc, last))
                    stack.enter_context(acc.autocast())
                    yield self._idx if index_on_device else idx
            self._optimizer_step()
            self._end_of_step(step)
        self.bar.close()
        if self.validator is not None:
            self.validator.close()
        self.watch.close()
        self.seconds = time.perf_counter() - started
        self._loop = None

    def backward(self, loss: torch.Tensor, *, tracked: torch.Tensor | None = None) -> None:
        """Backward of this micro-batch's ``loss`` (scaled for accumulation). ``tracked``: the loss to log,
        when it is not the one optimised (e.g. the instance part of DreamBooth's loss)."""
        self.accelerator.backward(loss / self.tc.gradient_accumulation_steps)
        self.tracker.add(loss if tracked is None else tracked, self.step, self._idx)

    def track(self, name: str, value: torch.Tensor) -> None:
        """Another loss to log as ``name`` (averaged over the log interval and the ranks, like the loss)."""
        if name not in self._extra_trackers:
            self._extra_trackers[name] = LossTracker(self.accelerator)
        self._extra_trackers[name].add(value, self.step)

    def _optimizer_step(self) -> None:
        if self.average_grads and self.world > 1:
            _average_gradients(self.average_grads)
        model = self.wrapped[0] if self.wrapped else None
        self.grad_norm = P.clip_grad_norm(model, self.params, self.accelerator, self.tc.max_grad_norm)
        self.optimizer.step()
        self.lr_scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        if self.after_step is not None:
            self.after_step()
        self.bar.update(1)

    def _end_of_step(self, step: int) -> None:
        report_step(  # host sync on log steps only
            step, self.tc, self.tracker, self.lr_scheduler, self.grad_norm, self.bar, self.log, self._extras
        )
        if self.validator is not None and self.validator.due(step):
            with self._averaged_weights():
                self.validator(step, **self.plain_models())
        C.end_of_step(step, self.cfg, self.out_dir, self.state, self.accelerator, self.tracker, self.watch)

    @contextlib.contextmanager
    def _averaged_weights(self) -> Iterator[None]:
        """With an EMA, its averaged weights stand in for the trained ones (and are put back after): a
        validation grid shows the model that will be saved, as diffusers' training scripts do."""
        if self.ema is None:
            yield
            return
        self.ema.store(self.params)
        self.ema.copy_to(self.params)
        try:
            yield
        finally:
            self.ema.restore(self.params)

    def _extras(self) -> dict[str, float]:
        values = {name: t.flush(self.step)["loss"] for name, t in self._extra_trackers.items()}
        return {**values, **(self.metrics() if self.metrics else {})}

    # ----------------------------------------------------------------------------------------------- end

    def finish(
        self,
        method: str,
        save: Callable[[Path], list[str]],
        *,
        prompt: str | None = None,
        check_replicas: bool = False,
        **extra: Any,
    ) -> TrainResult:
        """The run's result; rank 0 calls ``save(out_dir)`` (→ the file names written) and writes the run files.
        ``check_replicas``: record whether all DDP ranks hold bit-identical trainable weights."""
        trained = self.tc.max_steps - self.start_step
        extra.update(
            resumed_from_step=self.start_step,
            attempt=self.state.attempt,
            gradient_checkpointing=self.checkpointing.enabled,
            gradient_checkpointing_reason=self.checkpointing.reason,
            mixed_precision=self.accelerator.mixed_precision,  # what ran: a CPU may train fp32 (cpu_precision)
        )
        if self.validator is not None:
            extra["validation_grids"] = [str(p.relative_to(self.out_dir)) for p in self.validator.files]
        result = TrainResult(
            out_dir=self.out_dir,
            method=method,
            steps=self.tc.max_steps,
            final_loss=self.tracker.last_loss,
            seconds=round(self.seconds, 3),
            steps_per_sec=round(trained / max(self.seconds, 1e-9), 3),
            num_processes=self.world,
            extra=extra,
        )
        if check_replicas:
            model = next(iter(self.plain_models().values()))
            same = replicas_identical(model, self.accelerator)  # a collective: all ranks take part
            if same is not None:
                result.extra["replicas_identical"] = same
        if self.is_main:
            result.files = save(self.out_dir)
            write_run_files(self.cfg, self.out_dir, result, prompt=prompt)
        return result

    def trained_unet(self, unet: torch.nn.Module) -> torch.nn.Module | None:
        """A full fine-tune's UNet as a plain fp32 module on rank 0 (None elsewhere): gathered from the
        shards under FSDP (a collective: every rank calls it), with the EMA weights when there is an EMA
        (under FSDP each rank first puts its averaged shards into its own shards of the model)."""
        if self.fsdp and self.ema is not None:
            self.ema.copy_to(unet.parameters())
        weights = P.full_state_dict(unet) if self.fsdp else None
        if not self.is_main:
            return None
        if self.fsdp:
            plain = P.unsharded_class(unet).from_config(unet.config)
            plain.load_state_dict(weights)
        else:
            plain = self.accelerator.unwrap_model(unet)
            if self.ema is not None:
                self.ema.copy_to(plain.parameters())  # the averaged weights are the model
        return plain.to(torch.float32).eval()


def _average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Mean of each gradient over the ranks (a parameter that got none counts as zero), one all_reduce."""
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= torch.distributed.get_world_size()
    offset = 0
    for p, g in zip(params, grads, strict=True):
        p.grad = flat[offset : offset + g.numel()].view_as(g)
        offset += g.numel()
