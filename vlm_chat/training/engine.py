"""The training engine: one compact accelerate loop shared by all four stages.

Why not ``transformers.Trainer``? We need guarantees that are awkward to bolt onto it and short to write directly on
``accelerate``; each is kept in one named place of :class:`_Run`:

* **exact resume** (:meth:`_Run.resume`, :meth:`_Run.micro_step`) - the losses after ``resume_from_checkpoint``
  equal those of an uninterrupted run. Data order depends only on ``(seed, epoch)`` (:class:`EpochSampler`), the
  position inside the epoch is restored with ``accelerator.skip_first_batches``, and every micro-batch reseeds
  ``random``/``numpy``/``torch`` from ``(seed, step, micro-batch, rank)``, so dropout and any other randomness do not
  depend on how many random numbers were drawn before a crash; a checkpoint of another batch layout is refused;
* **atomic checkpoints** (:meth:`_Run.save_checkpoint`) - everything goes to a temporary directory in the same
  parent, is fsynced, and appears under its final name at once (:func:`vlm_chat.atomic.publish`); a crash mid-save
  leaves the previous checkpoint loadable, and ``resume_from_checkpoint: latest`` only considers complete ones;
* **NaN/inf stops the run** (:meth:`_Run.check_finite`) - a non-finite loss or gradient norm (computed every step,
  clipping or not) raises :class:`NonFiniteLossError` naming the step before any weight is touched;
* **checkpoints between optimizer steps only** (:meth:`_Run.step_end`), so resuming from any is exact: every
  ``save_steps``, every ``save_every_minutes``, at the end, and on SIGTERM/SIGINT (finish the step, save, raise
  :class:`TrainingInterrupted`: exit status 128 + signal; :mod:`vlm_chat.training.outcome`);
* **parameter groups** with their own learning rates (mapper vs LoRA), overridable from the config;
* **one loop for all stages**: a stage supplies a model, a dataset, a collate function and
  ``loss_fn(model, batch) -> (loss, metrics)``; stage 3 (DPO) runs policy and reference inside its ``loss_fn``.

accelerate provides mixed precision (``no``/``bf16``/``fp16``), gradient accumulation, DDP/FSDP/DeepSpeed through
``accelerate launch``, ``save_state``/``load_state`` (weights, optimizer, scheduler, RNG, scaler) and TensorBoard
logging; the learning-rate schedule is ``transformers.get_scheduler``. The checkpoint layout is in
:mod:`vlm_chat.training.checkpoints`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, extract_model_from_parallel, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlm_chat.atomic import atomic_directory, publish
from vlm_chat.training.args import TrainConfig, config_to_dict
from vlm_chat.training.checkpoints import (
    LOG_FILE,
    STATE_FILE,
    check_saved_weights,
    check_signature,
    complete_checkpoints,
    find_latest_checkpoint,
    only_trainable,
    resolve_resume,
    truncate_log,
)
from vlm_chat.training.optim import build_optimizer
from vlm_chat.training.outcome import NonFiniteLossError, StopOnSignal, TrainingInterrupted, TrainResult
from vlm_chat.training.sampler import EpochSampler, mix_seed

logger = logging.getLogger(__name__)

__all__ = ["EpochSampler", "NonFiniteLossError", "TrainConfig", "TrainResult", "TrainingInterrupted",
           "atomic_directory", "find_latest_checkpoint", "train"]

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Mapping[str, Any]]]


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _to_float(value: Any) -> float:
    return float(value.detach().float().mean().item()) if torch.is_tensor(value) else float(value)


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())


def _default_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable(); "
            "the stage must pass gradient_checkpointing_fn"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _release_accelerate_state() -> None:
    """Let the next :func:`train` call in this process choose its own mixed precision and accumulation.

    accelerate keeps process-wide singletons (``AcceleratorState``, ``GradientState``) that a second ``Accelerator``
    with other settings would refuse to change, and it has no public way to reset them: its own tests call these
    private ``_reset_state`` methods. The quickstart runs four stages in one process, so we do the same here, in
    this one place (the process group itself is kept).
    """
    AcceleratorState._reset_state(reset_partial_state=False)
    GradientState._reset_state()


def train(
    model: torch.nn.Module,
    train_dataset: Sequence,
    collate_fn: Callable[[list], Any],
    loss_fn: LossFn,
    cfg: TrainConfig,
    param_groups: list[dict] | None = None,
    eval_fn: Callable[[torch.nn.Module], Mapping[str, float]] | None = None,
    on_save: Callable[[Path], None] | None = None,
    gradient_checkpointing_fn: Callable[[torch.nn.Module], None] | None = None,
    lengths: Sequence[int] | None = None,
    dataset_fingerprint: str | None = None,
) -> TrainResult:
    """Train ``model`` with ``loss_fn`` on ``train_dataset`` following ``cfg``.

    Args:
        model: the module to train; parameters with ``requires_grad=False`` stay bit-identical.
        train_dataset: a map-style dataset (``len`` and ``__getitem__``) of raw samples.
        collate_fn: turns a list of samples into a batch (tensors are moved to the device by accelerate).
        loss_fn: ``loss_fn(model, batch) -> (loss, metrics)``; ``loss`` a scalar tensor, ``metrics`` a mapping
            of name -> float/scalar tensor, averaged over the logging window. ``model`` is the prepared
            (possibly DDP-wrapped) module: call it rather than its submodules so gradients synchronise;
            ``accelerate.utils.extract_model_from_parallel(model)`` gives the bare module (e.g. for
            ``disable_adapter()`` in DPO).
        cfg: engine settings (see :class:`TrainConfig`).
        param_groups: ``[{"name", "params", "lr"?, "weight_decay"?}]``; default one group "default" with all
            trainable parameters. ``cfg.lr_groups`` overrides learning rates by group name.
        eval_fn: ``eval_fn(model) -> metrics``, run every ``cfg.eval_steps`` and at the end (in eval mode,
            without gradients) and logged under ``eval/``.
        on_save: ``on_save(dir)`` writes the stage's own artifacts (e.g. ``save_pretrained``) into an empty
            directory that is published atomically with the checkpoint (``step-N/model``) and as
            ``output_dir/final`` after the last step. Called on the main process only.
        gradient_checkpointing_fn: enables gradient checkpointing on ``model`` when
            ``cfg.gradient_checkpointing``; default ``model.gradient_checkpointing_enable()``.
        lengths: a length proxy per sample; with ``cfg.group_by_length`` batches hold samples of similar length.
        dataset_fingerprint: a digest of the training rows (:func:`~vlm_chat.training.checkpoints.rows_fingerprint`);
            a resume with other rows (same count or not) is refused.

    Returns:
        A :class:`TrainResult`.

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf (the message names the step and the
            last good checkpoint).
        TrainingInterrupted: SIGTERM/SIGINT arrived; the step finished and a checkpoint was saved (a ``SystemExit``
            with code 128 + signal number).
        ValueError / ConfigError: inconsistent settings, e.g. a dataset smaller than one optimizer step or a
            resume checkpoint from a run with another batch layout.
    """
    output_dir = Path(cfg.output_dir)
    previous_determinism = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(),
    )
    if cfg.deterministic:
        # cuBLAS needs this before its first use to be deterministic; harmless on CPU.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    launched_world = int(os.environ.get("WORLD_SIZE", "1"))
    accelerator = Accelerator(
        # Under torchrun on a machine without CUDA, accelerate only forms a (gloo) process group when told to use
        # the CPU; otherwise every process would train alone and overwrite the others' checkpoints.
        cpu=launched_world > 1 and not torch.cuda.is_available(),
        mixed_precision=cfg.mixed_precision,
        gradient_accumulation_steps=cfg.gradient_accumulation_steps,
        log_with=cfg.trackers() or None,  # report_to, checked when the config was made
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        # One scheduler step per optimizer step, whatever the number of processes (accelerate's default
        # would step it once per process).
        step_scheduler_with_optimizer=False,
    )
    try:
        if accelerator.num_processes != launched_world:
            raise RuntimeError(
                f"launched as {launched_world} processes but accelerate formed {accelerator.num_processes}; "
                "launch with `accelerate launch` (see docs/training.md)"
            )
        run = _Run(accelerator, model, train_dataset, collate_fn, loss_fn, cfg, param_groups, eval_fn, on_save,
                   gradient_checkpointing_fn, lengths, dataset_fingerprint)
        return run.run()
    finally:
        accelerator.end_training()
        accelerator.free_memory()
        # Undo accelerate's autocast patch of model.forward so later inference runs in the model's own dtype.
        extract_model_from_parallel(model, keep_fp32_wrapper=False)
        _release_accelerate_state()
        torch.use_deterministic_algorithms(previous_determinism[0], warn_only=previous_determinism[1])


class _Run:
    """One call of :func:`train`: the prepared objects, the schedule, and where the run is."""

    def __init__(self, accelerator: Accelerator, model, dataset, collate_fn, loss_fn: LossFn, cfg: TrainConfig,
                 param_groups, eval_fn, on_save, gradient_checkpointing_fn, lengths, dataset_fingerprint=None):
        self.accelerator, self.cfg, self.loss_fn, self.eval_fn, self.on_save = accelerator, cfg, loss_fn, eval_fn, on_save
        self.output_dir = Path(cfg.output_dir)
        self.checkpoint_root = self.output_dir / "checkpoints"
        self.is_main = accelerator.is_main_process
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            for stale in self.checkpoint_root.glob(".tmp-*") if self.checkpoint_root.is_dir() else []:
                shutil.rmtree(stale, ignore_errors=True)  # leftovers of a crash mid-save
        accelerator.wait_for_everyone()

        set_seed(cfg.seed)
        self.samples_per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps * self.world
        self.steps_per_epoch = len(dataset) // self.samples_per_step
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"the training set has {len(dataset)} samples, fewer than one optimizer step needs "
                f"(per_device_train_batch_size {cfg.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{cfg.gradient_accumulation_steps} x {self.world} processes = {self.samples_per_step})"
            )
        self.max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_train_epochs * self.steps_per_epoch)
        warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * self.max_steps)

        if cfg.gradient_checkpointing:
            (gradient_checkpointing_fn or _default_gradient_checkpointing)(model)
        optimizer = build_optimizer(model, param_groups, cfg)
        scheduler = get_scheduler(
            cfg.lr_scheduler_type, optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps
        )
        if cfg.group_by_length and lengths is None:
            raise ValueError("group_by_length needs the samples' lengths; this stage does not provide them")
        self.sampler = EpochSampler(len(dataset), cfg.seed, self.samples_per_step,
                                    lengths=lengths if cfg.group_by_length else None)
        # Workers ignore SIGTERM/SIGINT (a scheduler signals the whole process group): this process stops them.
        loader = DataLoader(dataset, batch_size=cfg.per_device_train_batch_size, sampler=self.sampler,
                            collate_fn=collate_fn, num_workers=cfg.dataloader_num_workers,
                            worker_init_fn=StopOnSignal.ignore_in_worker)
        self.model, self.optimizer, self.loader, self.scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
        # DeepSpeed and FSDP shard and save their own state; elsewhere only trainable weights go into checkpoints.
        self.plain = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
        if self.plain:
            accelerator.register_save_state_pre_hook(only_trainable)
        self.group_names = [g["name"] for g in self.optimizer.param_groups]
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]
        # What fixes the data order: a checkpoint of a run that differs here cannot resume exactly.
        self.signature = {
            "seed": cfg.seed,
            "per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
            "num_processes": self.world,
            "dataset_size": len(dataset),
        }
        if dataset_fingerprint is not None:
            self.signature["dataset_fingerprint"] = dataset_fingerprint
        self.stop = StopOnSignal()
        self.last_save_time = time.monotonic()
        self.global_step = 0
        self.resumed_from: Path | None = None
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, Any]] = []
        self.window: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------ guarantees
    def resume(self) -> None:
        """Exact resume: refuse another data order, then restore weights, optimizer, scheduler, RNG and the step."""
        resume_dir = resolve_resume(self.cfg.resume_from_checkpoint, self.output_dir)
        if resume_dir is None:
            return
        state = json.loads((resume_dir / STATE_FILE).read_text())
        check_signature(resume_dir, state, self.signature)
        if self.plain:
            check_saved_weights(self.model, resume_dir / "accelerate")
            self.accelerator.load_state(str(resume_dir / "accelerate"), strict=False)  # frozen weights: not saved
        else:
            self.accelerator.load_state(str(resume_dir / "accelerate"))
        self.global_step = int(state["global_step"])
        self.resumed_from = self.last_checkpoint = resume_dir
        logger.info("resumed from %s at step %d", resume_dir, self.global_step)

    def check_finite(self, value: torch.Tensor, what: str) -> None:
        """Stop every process before the weights change when ``value`` holds NaN/inf; name the last good checkpoint."""
        finite = torch.isfinite(value.detach().float()).all().to(self.accelerator.device).float()
        if self.world > 1:
            finite = self.accelerator.reduce(finite, reduction="sum") / self.world  # every rank stops together
        if finite.item() < 1:
            kept = f"last good checkpoint: {self.last_checkpoint}" if self.last_checkpoint else "no checkpoint was written yet"
            raise NonFiniteLossError(
                f"non-finite {what} ({value.detach().float().mean().item()}) at step {self.global_step + 1} "
                f"(epoch {self.global_step // self.steps_per_epoch}); stopped before updating the weights; {kept}"
            )

    def save_checkpoint(self) -> Path:
        """Atomic checkpoint ``step-N``: written under a temporary name, the state file last, then published whole."""
        step = self.global_step
        final, tmp = self.checkpoint_root / f"step-{step}", self.checkpoint_root / f".tmp-step-{step}"
        if self.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self.accelerator.save_state(str(tmp / "accelerate"))
        if self.is_main:
            if self.on_save is not None:
                (tmp / "model").mkdir()
                self.on_save(tmp / "model")
            payload = {**self.signature, "global_step": step, "epoch": step / self.steps_per_epoch,
                       "max_steps": self.max_steps}
            # Written last: its presence marks the checkpoint complete for resume_from_checkpoint: latest.
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
            publish(tmp, final)
            if self.cfg.save_total_limit > 0:
                for _, old in complete_checkpoints(self.checkpoint_root)[: -self.cfg.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        self.accelerator.wait_for_everyone()
        self.last_checkpoint, self.last_save_time = final, time.monotonic()
        return final

    # ------------------------------------------------------------------------------------------ pieces of a step
    def micro_step(self, batch, micro: int) -> tuple[float, dict[str, float], torch.Tensor | None]:
        """Forward + backward of one micro-batch; on the last micro-batch of a step, clip and update.

        Returns:
            ``(loss, metrics, grad_norm)``; ``grad_norm`` is None except on the last micro-batch of a step.
        """
        cfg, accelerator = self.cfg, self.accelerator
        # Exact resume: the randomness of this micro-batch depends only on where it is in the run.
        set_seed(mix_seed(cfg.seed, self.global_step, micro, self.rank))
        grad_norm = None
        with accelerator.accumulate(self.model):
            with accelerator.autocast():
                loss, metrics = self.loss_fn(self.model, batch)
            self.check_finite(loss, "loss")
            accelerator.backward(loss)
            if accelerator.sync_gradients:
                # The norm is computed even without clipping (max norm inf: the gradients are multiplied by 1.0,
                # exactly), so a non-finite gradient stops the run whatever max_grad_norm says.
                grad_norm = accelerator.clip_grad_norm_(self.trainable, cfg.max_grad_norm or math.inf)
                if grad_norm is not None and cfg.mixed_precision != "fp16":  # fp16's scaler skips overflows
                    self.check_finite(grad_norm, "gradient norm")
                self.optimizer.step()
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)
        return loss.detach().float().item(), {k: _to_float(v) for k, v in metrics.items()}, grad_norm

    def step_record(self, losses: list[float], metrics: list[dict[str, float]], grad_norm, seconds: float) -> dict:
        """The step's loss and metrics, averaged over its micro-batches and processes, with the learning rates."""
        keys = sorted(metrics[0]) if metrics else []
        local = torch.tensor(
            [sum(losses) / len(losses)] + [sum(m[k] for m in metrics) / len(metrics) for k in keys],
            dtype=torch.float64, device=self.accelerator.device,
        )  # fmt: skip
        if self.world > 1:
            local = self.accelerator.reduce(local, reduction="mean")
        values = local.tolist()
        record = {"step": self.global_step, "epoch": self.global_step / self.steps_per_epoch, "loss": values[0]}
        record.update(dict(zip(keys, values[1:])))
        if grad_norm is not None:
            record["grad_norm"] = _to_float(grad_norm)
        for name, lr in zip(self.group_names, self.scheduler.get_last_lr()):
            record.setdefault(f"lr/{name.split('/')[0]}", lr)
        record["step_seconds"] = seconds  # data loading + forward/backward + update
        return record

    def log(self, record: dict[str, Any], log_fh, progress) -> None:
        """Append the step to the JSONL log; every ``logging_steps`` log the window's means to the trackers."""
        self.history.append(record)
        self.window.append(record)
        if log_fh is not None:
            log_fh.write(json.dumps(record) + "\n")
            log_fh.flush()
        progress.update(1)
        progress.set_postfix(loss=f"{record['loss']:.4f}")
        if self.global_step % self.cfg.logging_steps == 0 or self.global_step == self.max_steps:
            # Losses, norms and timings are averaged over the window; where the run is (epoch, the learning rates)
            # is read at its last step.
            last = self.window[-1]
            means = {
                k: last[k] if k == "epoch" or k.startswith("lr/") else sum(r[k] for r in self.window) / len(self.window)
                for k in last
                if k != "step"
            }
            self.accelerator.log({f"train/{k}": v for k, v in means.items()}, step=self.global_step)
            if self.is_main:
                logger.info("step %d/%d %s", self.global_step, self.max_steps, _fmt(means))
            self.window = []

    def evaluate(self) -> dict[str, float]:
        """The stage's ``eval_fn`` on the bare model, in eval mode and without gradients; logged under ``eval/``."""
        bare = self.accelerator.unwrap_model(self.model)
        bare.eval()
        with torch.no_grad():
            metrics = {f"eval/{k}": _to_float(v) for k, v in self.eval_fn(bare).items()}
        self.model.train()
        self.accelerator.log(metrics, step=self.global_step)
        if self.is_main:
            logger.info("step %d eval %s", self.global_step, _fmt(metrics))
        return metrics

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> TrainResult:
        cfg = self.cfg
        self.resume()
        log_path = self.output_dir / LOG_FILE
        if self.is_main:
            truncate_log(log_path, self.global_step)  # a resumed run's log equals an uninterrupted one
        if self.accelerator.log_with:
            hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}
            self.accelerator.init_trackers("train", config=hparams)
        (logger.info if self.is_main else logger.debug)(
            "training %d steps (%d per epoch; %d samples/step = %d x %d accumulation x %d processes), "
            "%d trainable parameters in groups %s",
            self.max_steps, self.steps_per_epoch, self.samples_per_step, cfg.per_device_train_batch_size,
            cfg.gradient_accumulation_steps, self.world, sum(p.numel() for p in self.trainable),
            sorted(set(n.split("/")[0] for n in self.group_names)),
        )  # fmt: skip
        progress = tqdm(total=self.max_steps, initial=self.global_step, desc="train",
                        disable=True if cfg.disable_tqdm or not self.accelerator.is_local_main_process else None)  # None: a bar on a terminal only
        log_fh = open(log_path, "a", encoding="utf-8") if self.is_main else None
        self.model.train()
        with self.stop:
            try:
                self._loop(log_fh, progress)
            finally:
                progress.close()
                if log_fh is not None:
                    log_fh.close()
            return self._finish()

    def _loop(self, log_fh, progress) -> None:
        cfg = self.cfg
        epoch = self.global_step // self.steps_per_epoch
        # Exact resume: skip the micro-batches of this epoch that the checkpointed run already trained on.
        skip = (self.global_step - epoch * self.steps_per_epoch) * cfg.gradient_accumulation_steps
        while self.global_step < self.max_steps:
            self.loader.set_epoch(epoch)
            self.sampler.set_epoch(epoch)
            batches = self.accelerator.skip_first_batches(self.loader, skip) if skip else self.loader
            skip = 0
            losses, metrics, start = [], [], time.perf_counter()
            for batch in batches:
                loss, step_metrics, grad_norm = self.micro_step(batch, len(losses))
                losses.append(loss)
                metrics.append(step_metrics)
                if not self.accelerator.sync_gradients:
                    continue
                self.global_step += 1
                self.log(self.step_record(losses, metrics, grad_norm, time.perf_counter() - start), log_fh, progress)
                losses, metrics, start = [], [], time.perf_counter()
                if self.eval_fn is not None and cfg.eval_steps and self.global_step % cfg.eval_steps == 0:
                    self.history[-1].update(self.evaluate())
                if self.global_step >= self.max_steps:
                    return
                self.step_end()
            epoch += 1

    def step_end(self) -> None:
        """Between two optimizer steps: checkpoint when ``save_steps`` or ``save_every_minutes`` says so, and stop
        (after a checkpoint) when a signal arrived. Every process takes the same decision."""
        cfg = self.cfg
        due = bool(cfg.save_steps) and self.global_step % cfg.save_steps == 0
        timed = cfg.save_every_minutes > 0 and time.monotonic() - self.last_save_time >= 60 * cfg.save_every_minutes
        received = self.stop.received or 0
        if self.world > 1:  # a signal or a clock may reach one rank first: the largest flag wins everywhere
            flags = torch.tensor([float(timed), float(received)], device=self.accelerator.device)
            torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)  # accelerate's reduce has no max
            timed, received = bool(flags[0].item()), int(flags[1].item())
        if due or timed or received:
            self.save_checkpoint()
        if received:
            stop = TrainingInterrupted(received, self.global_step, self.last_checkpoint)
            (logger.warning if self.is_main else logger.debug)("%s (exit status %d)", stop, stop.code)
            raise stop

    def _finish(self) -> TrainResult:
        """The final evaluation, the last checkpoint and ``final/`` (atomic), then the result."""
        cfg = self.cfg
        if self.eval_fn is not None and not (cfg.eval_steps and self.global_step % cfg.eval_steps == 0 and self.history):
            final_eval = self.evaluate()
            if self.history:
                self.history[-1].update(final_eval)
        if self.last_checkpoint is None or self.last_checkpoint.name != f"step-{self.global_step}":
            self.save_checkpoint()
        final_dir = None
        if self.on_save is not None:
            final_dir = self.output_dir / "final"
            if self.is_main:
                with atomic_directory(final_dir) as tmp:
                    self.on_save(tmp)
                logger.info("wrote %s", final_dir)
            self.accelerator.wait_for_everyone()
        return TrainResult(
            global_step=self.global_step, max_steps=self.max_steps, history=self.history,
            last_checkpoint=self.last_checkpoint, final_dir=final_dir, resumed_from=self.resumed_from,
            output_dir=self.output_dir,
        )  # fmt: skip
