"""The training engine: one compact accelerate loop shared by all four stages.

Why not ``transformers.Trainer``? We need guarantees that are awkward to bolt onto it and short to
write directly on ``accelerate``:

* **exact resume** - the losses after ``--resume`` equal those of an uninterrupted run. Data order depends
  only on ``(seed, epoch)`` (:class:`EpochSampler`), the position inside the epoch is restored with
  ``accelerator.skip_first_batches``, and every micro-batch reseeds ``random``/``numpy``/``torch`` from
  ``(seed, step, micro-batch, rank)``, so dropout and any other randomness do not depend on how many
  random numbers were drawn before a crash;
* **atomic checkpoints** - everything goes to a temporary directory in the same parent, is fsynced, and
  appears under its final name with one ``os.replace``; a crash mid-save leaves the previous checkpoint
  loadable, and ``--resume latest`` only considers complete checkpoints;
* **NaN/inf stops the run** - a non-finite loss (or gradient norm) raises :class:`NonFiniteLossError`
  naming the step before any weight is touched; the last good checkpoint stays on disk;
* **parameter groups** with their own learning rates (mapper vs LoRA), overridable from the config;
* **one loop for all stages**: a stage supplies a model, a dataset, a collate function and
  ``loss_fn(model, batch) -> (loss, metrics)``; stage 3 (DPO) runs policy and reference (the same model
  with adapters disabled) inside its ``loss_fn``.

accelerate provides mixed precision (``no``/``bf16``/``fp16``), gradient accumulation, DDP/FSDP/DeepSpeed
through ``accelerate launch``, ``save_state``/``load_state`` (weights, optimizer, scheduler, RNG, scaler)
and TensorBoard logging; the learning-rate schedule is ``transformers.get_scheduler``.

Layout of ``output_dir``::

    checkpoints/step-N/trainer_state.json   engine position (written last: marks the checkpoint complete)
    checkpoints/step-N/accelerate/          accelerate state: trainable weights, optimizer, scheduler, RNG
    checkpoints/step-N/model/               whatever the stage's ``on_save(dir)`` writes (e.g. save_pretrained)
    final/                                  ``on_save`` output after the last step (atomic as well)
    train_log.jsonl                         one JSON line per optimizer step (loss, lr, metrics)
    logs/                                   TensorBoard event files

Only *trainable* parameters (and buffers) are stored in ``accelerate/``: frozen weights (a vision tower,
an LLM under LoRA) are rebuilt by the stage from their source, so a checkpoint costs the size of what
is trained. On resume the stored keys are checked against the model's trainable parameters.
"""

import json
import logging
import math
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import DistributedType, ProjectConfiguration, extract_model_from_parallel, set_seed
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm
from transformers import get_scheduler

from vlm_chat.atomic import _publish, atomic_directory
from vlm_chat.training.args import ConfigError, TrainConfig, config_to_dict

logger = logging.getLogger(__name__)

__all__ = [
    "EpochSampler",
    "NonFiniteLossError",
    "TrainConfig",
    "atomic_directory",
    "find_latest_checkpoint",
    "train",
]

STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.jsonl"
_STEP_DIR = re.compile(r"^step-(\d+)$")

LossFn = Callable[[torch.nn.Module, Any], tuple[torch.Tensor, Mapping[str, Any]]]


class NonFiniteLossError(RuntimeError):
    """The loss or the gradient norm became NaN/inf; the run stopped before updating the weights."""


# ----------------------------------------------------------------------------------------------------------------
# Atomic directories


def _complete_checkpoints(checkpoint_root: Path) -> list[tuple[int, Path]]:
    if not checkpoint_root.is_dir():
        return []
    found = []
    for child in checkpoint_root.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint ``output_dir/checkpoints/step-N`` (with its state file), or ``None``."""
    found = _complete_checkpoints(Path(output_dir) / "checkpoints")
    return found[-1][1] if found else None


def _resolve_resume(resume: str | None, output_dir: Path) -> Path | None:
    if resume is None:
        return None
    if resume == "latest":
        latest = find_latest_checkpoint(output_dir)
        if latest is None:
            logger.warning("resume='latest' but %s has no complete checkpoint; starting from scratch", output_dir)
        return latest
    path = Path(resume)
    if not (path / STATE_FILE).is_file():
        raise FileNotFoundError(
            f"resume: {resume} is not a complete checkpoint (no {STATE_FILE}); "
            f"checkpoints look like {output_dir / 'checkpoints' / 'step-N'}, or pass 'latest'"
        )
    return path


# ----------------------------------------------------------------------------------------------------------------
# Data order


class EpochSampler(Sampler[int]):
    """Shuffled indices whose order depends only on ``(seed, epoch)``, cut to whole optimizer steps.

    Cutting each epoch to a multiple of the samples per optimizer step (``batch * accumulation *
    processes``) means every optimizer step sees exactly that many samples, so gradient accumulation and
    multi-process runs are equivalent to one large batch, and an epoch boundary never splits a step.
    The few samples left over differ from epoch to epoch (the permutation changes).

    With ``lengths`` (and ``group`` > 1), samples of similar length share a batch, as transformers'
    ``group_by_length``: the shuffled order is cut into windows of ``group`` optimizer steps, each window is
    sorted by length and cut into steps, and the steps are shuffled again. Padding (wasted compute) drops while
    the order still depends only on ``(seed, epoch)``, so resuming stays exact. (transformers'
    ``LengthGroupedSampler`` does not cut epochs to whole steps, which the exact-resume guarantee relies on.)

    Args:
        num_samples: dataset length.
        seed: data-order seed.
        multiple: epoch length is rounded down to a multiple of this.
        lengths: optional length (any monotone proxy, e.g. characters) of every sample.
        group: optimizer steps per length-sorting window.
    """

    def __init__(self, num_samples: int, seed: int, multiple: int = 1, lengths: Sequence[int] | None = None,
                 group: int = 32):
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"lengths has {len(lengths)} entries for {num_samples} samples")
        self.num_samples = num_samples
        self.seed = seed
        self.multiple = multiple
        self.lengths = lengths
        self.group = group
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return (self.num_samples // self.multiple) * self.multiple

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(_mix(self.seed, self.epoch, 0x5EED))
        order = torch.randperm(self.num_samples, generator=generator)[: len(self)].tolist()
        if self.lengths is None or self.group <= 1:
            yield from order
            return
        steps = []
        window = self.multiple * self.group
        for start in range(0, len(order), window):
            chunk = sorted(order[start : start + window], key=lambda i: -self.lengths[i])
            steps += [chunk[i : i + self.multiple] for i in range(0, len(chunk), self.multiple)]
        for k in torch.randperm(len(steps), generator=generator).tolist():
            yield from steps[k]


def _mix(*parts: int) -> int:
    """Combine integers into one seed in [0, 2**32) (numpy's limit); stable across runs and platforms."""
    value = 0x9E3779B9
    for part in parts:
        value = (value * 1_000_003 + int(part)) % (2**61 - 1)
    return value % (2**32)


# ----------------------------------------------------------------------------------------------------------------
# Optimizer


def _build_optimizer(model: torch.nn.Module, param_groups, cfg: TrainConfig) -> torch.optim.Optimizer:
    names = {id(p): n for n, p in model.named_parameters()}
    if param_groups is None:
        param_groups = [{"name": "default", "params": [p for p in model.parameters() if p.requires_grad]}]
    group_names = [g.get("name", f"group{i}") for i, g in enumerate(param_groups)]
    if len(set(group_names)) != len(group_names):
        raise ValueError(f"parameter group names must be unique, got {group_names}")
    lr_groups = dict(cfg.lr_groups or {})
    unknown = sorted(set(lr_groups) - set(group_names))
    if unknown:
        raise ConfigError(f"config key 'lr_groups' names unknown parameter group(s) {unknown}; valid: {group_names}")

    seen: set[int] = set()
    groups = []
    for name, group in zip(group_names, param_groups):
        params = list(group["params"])
        frozen = [names.get(id(p), "?") for p in params if not p.requires_grad]
        if frozen:
            raise ValueError(f"parameter group {name!r} holds frozen parameters: {frozen[:5]}")
        twice = [names.get(id(p), "?") for p in params if id(p) in seen]
        if twice:
            raise ValueError(f"parameters in more than one group (second: {name!r}): {twice[:5]}")
        seen.update(id(p) for p in params)
        lr = lr_groups.get(name, group.get("lr", cfg.learning_rate))
        weight_decay = group.get("weight_decay", cfg.weight_decay)
        # No decay on biases, norms and scalars (logit scale): decaying them hurts and is not regularisation.
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        for suffix, ps, wd in (("", decay, weight_decay), ("/no_decay", no_decay, 0.0)):
            if ps:
                groups.append({"params": ps, "lr": lr, "weight_decay": wd, "name": name + suffix})
    missing = [n for n, p in model.named_parameters() if p.requires_grad and id(p) not in seen]
    if missing:
        raise ValueError(f"{len(missing)} trainable parameters are in no parameter group, e.g. {missing[:5]}")
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, lr=cfg.learning_rate, betas=(cfg.adam_beta1, cfg.adam_beta2), eps=cfg.adam_epsilon)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoint contents


def _trainable_keys(model: torch.nn.Module) -> set[str]:
    """State-dict keys worth saving: trainable parameters and (persistent) buffers."""
    keep = {n for n, p in model.named_parameters() if p.requires_grad}
    keep |= {n for n, _ in model.named_buffers()}
    return keep


def _only_trainable(models, weights, output_dir) -> None:
    """accelerate save hook: drop frozen weights from the state dicts about to be written."""
    for model, state in zip(models, weights):
        keep = _trainable_keys(model)
        for key in [k for k in state if k not in keep]:
            del state[key]


def _check_saved_weights(model: torch.nn.Module, state_dir: Path) -> None:
    """Refuse a checkpoint whose weights do not cover the model's trainable parameters (or name unknown keys)."""
    from safetensors import safe_open

    path = state_dir / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint is missing {path}")
    with safe_open(str(path), framework="pt") as fh:
        saved = set(fh.keys())
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(saved - set(state))
    saved_ids = {id(state[k]) for k in saved if k in state}
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and id(p) not in saved_ids)
    if unexpected or missing:
        raise ValueError(
            f"checkpoint {state_dir.parent} does not match the model: missing trainable {missing[:5]}"
            f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            " (was it written by a run with other trainable parameters?)"
        )


# ----------------------------------------------------------------------------------------------------------------
# The loop


def _to_float(value: Any) -> float:
    return float(value.detach().float().mean().item()) if torch.is_tensor(value) else float(value)


def _default_gradient_checkpointing(model: torch.nn.Module) -> None:
    if not hasattr(model, "gradient_checkpointing_enable"):
        raise ValueError(
            f"gradient_checkpointing: {type(model).__name__} has no gradient_checkpointing_enable(); "
            "the stage must pass gradient_checkpointing_fn"
        )
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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
) -> dict[str, Any]:
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

    Returns:
        ``{"global_step", "max_steps", "history" (one dict per step run in this call), "last_checkpoint",
        "final_dir", "resumed_from", "output_dir"}``.

    Raises:
        NonFiniteLossError: the loss or gradient norm became NaN/inf (the message names the step and the
            last good checkpoint).
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
        log_with="tensorboard" if cfg.report_to == "tensorboard" else None,
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
        return _train(
            accelerator, model, train_dataset, collate_fn, loss_fn, cfg, param_groups, eval_fn, on_save,
            gradient_checkpointing_fn, lengths,
        )  # fmt: skip
    finally:
        accelerator.end_training()
        accelerator.free_memory()
        # Undo accelerate's autocast patch of model.forward so later inference runs in the model's own dtype.
        extract_model_from_parallel(model, keep_fp32_wrapper=False)
        # accelerate keeps process-wide singletons; reset them so the next stage in this process can choose
        # its own mixed precision / accumulation (the process group itself is kept).
        AcceleratorState._reset_state(reset_partial_state=False)
        GradientState._reset_state()
        torch.use_deterministic_algorithms(previous_determinism[0], warn_only=previous_determinism[1])


def _train(accelerator, model, train_dataset, collate_fn, loss_fn, cfg, param_groups, eval_fn, on_save, gc_fn,
           lengths=None):
    output_dir = Path(cfg.output_dir)
    checkpoint_root = output_dir / "checkpoints"
    is_main = accelerator.is_main_process
    world = accelerator.num_processes
    rank = accelerator.process_index
    if is_main:
        output_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_root.glob(".tmp-*") if checkpoint_root.is_dir() else []:
            shutil.rmtree(stale, ignore_errors=True)  # leftovers of a crash mid-save
    accelerator.wait_for_everyone()

    set_seed(cfg.seed)
    samples_per_step = cfg.per_device_batch_size * cfg.gradient_accumulation_steps * world
    steps_per_epoch = len(train_dataset) // samples_per_step
    if steps_per_epoch == 0:
        raise ValueError(
            f"the training set has {len(train_dataset)} samples, fewer than one optimizer step needs "
            f"(per_device_batch_size {cfg.per_device_batch_size} x gradient_accumulation_steps "
            f"{cfg.gradient_accumulation_steps} x {world} processes = {samples_per_step})"
        )
    max_steps = cfg.max_steps if cfg.max_steps > 0 else math.ceil(cfg.num_epochs * steps_per_epoch)
    warmup = cfg.warmup_steps if cfg.warmup_steps > 0 else math.ceil(cfg.warmup_ratio * max_steps)

    if cfg.gradient_checkpointing:
        (gc_fn or _default_gradient_checkpointing)(model)
    optimizer = _build_optimizer(model, param_groups, cfg)
    scheduler = get_scheduler(cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
    if cfg.group_by_length and lengths is None:
        raise ValueError("group_by_length needs the samples' lengths; this stage does not provide them")
    grouped = lengths if cfg.group_by_length else None
    sampler = EpochSampler(len(train_dataset), cfg.seed, samples_per_step, lengths=grouped)
    loader = DataLoader(
        train_dataset,
        batch_size=cfg.per_device_batch_size,
        sampler=sampler,
        collate_fn=collate_fn,
        num_workers=cfg.num_workers,
    )
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    plain = accelerator.distributed_type not in (DistributedType.DEEPSPEED, DistributedType.FSDP)
    if plain:
        accelerator.register_save_state_pre_hook(_only_trainable)
    group_names = [g["name"] for g in optimizer.param_groups]
    trainable = [p for p in model.parameters() if p.requires_grad]

    run_signature = {
        "seed": cfg.seed,
        "per_device_batch_size": cfg.per_device_batch_size,
        "gradient_accumulation_steps": cfg.gradient_accumulation_steps,
        "num_processes": world,
        "dataset_size": len(train_dataset),
    }
    global_step = 0
    resume_dir = _resolve_resume(cfg.resume, output_dir)
    if resume_dir is not None:
        state = json.loads((resume_dir / STATE_FILE).read_text())
        changed = {k: (state.get(k), v) for k, v in run_signature.items() if state.get(k) != v}
        if changed:
            details = ", ".join(f"{k}: checkpoint {old} vs now {new}" for k, (old, new) in changed.items())
            raise ConfigError(f"cannot resume exactly from {resume_dir}: the data order would differ ({details})")
        if plain:
            _check_saved_weights(model, resume_dir / "accelerate")
            accelerator.load_state(str(resume_dir / "accelerate"), strict=False)
        else:
            accelerator.load_state(str(resume_dir / "accelerate"))
        global_step = int(state["global_step"])
        logger.info("resumed from %s at step %d", resume_dir, global_step)
    last_checkpoint = resume_dir

    log_path = output_dir / LOG_FILE
    if is_main:
        _truncate_log(log_path, global_step)
    if cfg.report_to != "none":
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in config_to_dict(cfg).items()}
        accelerator.init_trackers("train", config=hparams)

    def save_checkpoint(step: int) -> Path:
        final = checkpoint_root / f"step-{step}"
        tmp = checkpoint_root / f".tmp-step-{step}"
        if is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        accelerator.wait_for_everyone()
        accelerator.save_state(str(tmp / "accelerate"))
        if is_main:
            if on_save is not None:
                (tmp / "model").mkdir()
                on_save(tmp / "model")
            payload = {**run_signature, "global_step": step, "epoch": step / steps_per_epoch, "max_steps": max_steps}
            # Written last: its presence marks the checkpoint complete for --resume latest.
            (tmp / STATE_FILE).write_text(json.dumps(payload, indent=2))
            _publish(tmp, final)
            complete = _complete_checkpoints(checkpoint_root)
            if cfg.save_total_limit > 0:
                for _, old in complete[: -cfg.save_total_limit]:
                    shutil.rmtree(old, ignore_errors=True)
            logger.info("saved checkpoint %s", final)
        accelerator.wait_for_everyone()
        return final

    def run_eval(step: int) -> dict[str, float]:
        bare = accelerator.unwrap_model(model)
        bare.eval()
        with torch.no_grad():
            metrics = {f"eval/{k}": _to_float(v) for k, v in eval_fn(bare).items()}
        model.train()
        accelerator.log(metrics, step=step)
        if is_main:
            logger.info("step %d eval %s", step, _fmt(metrics))
        return metrics

    (logger.info if is_main else logger.debug)(
        "training %d steps (%d per epoch; %d samples/step = %d x %d accumulation x %d processes), "
        "%d trainable parameters in groups %s",
        max_steps, steps_per_epoch, samples_per_step, cfg.per_device_batch_size, cfg.gradient_accumulation_steps,
        world, sum(p.numel() for p in trainable), sorted(set(n.split("/")[0] for n in group_names)),
    )  # fmt: skip
    history: list[dict[str, Any]] = []
    window: list[dict[str, Any]] = []
    progress = tqdm(
        total=max_steps,
        initial=global_step,
        desc="train",
        disable=cfg.disable_tqdm or not accelerator.is_local_main_process,
    )
    model.train()
    epoch = global_step // steps_per_epoch
    skip = (global_step - epoch * steps_per_epoch) * cfg.gradient_accumulation_steps
    log_fh = open(log_path, "a", encoding="utf-8") if is_main else None
    try:
        while global_step < max_steps:
            loader.set_epoch(epoch)
            sampler.set_epoch(epoch)
            epoch_loader = accelerator.skip_first_batches(loader, skip) if skip else loader
            skip = 0
            micro = 0
            step_losses: list[float] = []
            step_metrics: list[Mapping[str, Any]] = []
            step_start = time.perf_counter()
            for batch in epoch_loader:
                set_seed(_mix(cfg.seed, global_step, micro, rank))
                with accelerator.accumulate(model):
                    with accelerator.autocast():
                        loss, metrics = loss_fn(model, batch)
                    _check_finite(accelerator, loss.detach(), "loss", global_step + 1, epoch, last_checkpoint)
                    accelerator.backward(loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        if cfg.max_grad_norm > 0:
                            grad_norm = accelerator.clip_grad_norm_(trainable, cfg.max_grad_norm)
                            if cfg.mixed_precision != "fp16":  # fp16's scaler skips overflowing steps by design
                                _check_finite(
                                    accelerator, grad_norm, "gradient norm", global_step + 1, epoch, last_checkpoint
                                )
                        optimizer.step()
                        scheduler.step()
                        optimizer.zero_grad(set_to_none=True)
                step_losses.append(loss.detach().float().item())
                step_metrics.append({k: _to_float(v) for k, v in metrics.items()})
                micro += 1
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                record = _step_record(accelerator, global_step, steps_per_epoch, step_losses, step_metrics, grad_norm)
                for name, lr in zip(group_names, scheduler.get_last_lr()):
                    record.setdefault(f"lr/{name.split('/')[0]}", lr)
                record["step_seconds"] = time.perf_counter() - step_start  # data loading + forward/backward + update
                step_start = time.perf_counter()
                history.append(record)
                window.append(record)
                micro, step_losses, step_metrics = 0, [], []
                if log_fh is not None:
                    log_fh.write(json.dumps(record) + "\n")
                    log_fh.flush()
                progress.update(1)
                progress.set_postfix(loss=f"{record['loss']:.4f}")
                if global_step % cfg.logging_steps == 0 or global_step == max_steps:
                    # Losses, norms and timings are averaged over the window; where the run is (epoch, the
                    # learning rates) is read at its last step.
                    last = window[-1]
                    means = {
                        k: last[k] if k == "epoch" or k.startswith("lr/") else sum(r[k] for r in window) / len(window)
                        for k in last
                        if k != "step"
                    }
                    accelerator.log({f"train/{k}": v for k, v in means.items()}, step=global_step)
                    if is_main:
                        logger.info("step %d/%d %s", global_step, max_steps, _fmt(means))
                    window = []
                if eval_fn is not None and cfg.eval_steps and global_step % cfg.eval_steps == 0:
                    record.update(run_eval(global_step))
                if cfg.save_steps and global_step % cfg.save_steps == 0 and global_step < max_steps:
                    last_checkpoint = save_checkpoint(global_step)
                if global_step >= max_steps:
                    break
            else:
                epoch += 1
    finally:
        progress.close()
        if log_fh is not None:
            log_fh.close()

    if eval_fn is not None and not (cfg.eval_steps and global_step % cfg.eval_steps == 0 and history):
        final_eval = run_eval(global_step)
        if history:
            history[-1].update(final_eval)
    if last_checkpoint is None or last_checkpoint.name != f"step-{global_step}":
        last_checkpoint = save_checkpoint(global_step)
    final_dir = None
    if on_save is not None:
        final_dir = output_dir / "final"
        if is_main:
            with atomic_directory(final_dir) as tmp:
                on_save(tmp)
            logger.info("wrote %s", final_dir)
        accelerator.wait_for_everyone()
    return {
        "global_step": global_step,
        "max_steps": max_steps,
        "history": history,
        "last_checkpoint": last_checkpoint,
        "final_dir": final_dir,
        "resumed_from": resume_dir,
        "output_dir": output_dir,
    }


def _check_finite(accelerator, value: torch.Tensor, what: str, step: int, epoch: int, last_checkpoint) -> None:
    finite = torch.isfinite(value.detach().float()).all().to(accelerator.device).float()
    if accelerator.num_processes > 1:
        finite = accelerator.reduce(finite, reduction="sum") / accelerator.num_processes  # every rank stops together
    if finite.item() < 1:
        kept = f"last good checkpoint: {last_checkpoint}" if last_checkpoint else "no checkpoint was written yet"
        raise NonFiniteLossError(
            f"non-finite {what} ({value.detach().float().mean().item()}) at step {step} (epoch {epoch}); "
            f"stopped before updating the weights; {kept}"
        )


def _step_record(accelerator, step, steps_per_epoch, losses, metrics, grad_norm) -> dict[str, Any]:
    keys = sorted(metrics[0]) if metrics else []
    local = torch.tensor(
        [sum(losses) / len(losses)] + [sum(m[k] for m in metrics) / len(metrics) for k in keys],
        dtype=torch.float64,
        device=accelerator.device,
    )
    if accelerator.num_processes > 1:
        local = accelerator.reduce(local, reduction="mean")
    values = local.tolist()
    record = {"step": step, "epoch": step / steps_per_epoch, "loss": values[0]}
    record.update(dict(zip(keys, values[1:])))
    if grad_norm is not None:
        record["grad_norm"] = _to_float(grad_norm)
    return record


def _truncate_log(path: Path, step: int) -> None:
    """Keep only log lines up to ``step`` so a resumed run's log equals an uninterrupted one."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash
    path.write_text("".join(k + "\n" for k in kept), encoding="utf-8")


def _fmt(metrics: Mapping[str, float]) -> str:
    return " ".join(f"{k}={v:.4g}" for k, v in metrics.items())
