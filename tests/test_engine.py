"""The training engine on a tiny regression problem: learning, freezing, resume, atomicity, NaN, accumulation."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vlm_chat.training.args import ConfigError, TrainConfig
from vlm_chat.training.engine import (
    EpochSampler,
    NonFiniteLossError,
    atomic_directory,
    find_latest_checkpoint,
    train,
)


class SimulatedCrash(RuntimeError):
    """Stands in for a process dying at a chosen point."""


def _dataset(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=g)
    y = x @ torch.randn(4, 2, generator=g) + 0.5
    return [(x[i], y[i]) for i in range(n)]


def _collate(samples):
    return {"x": torch.stack([s[0] for s in samples]), "y": torch.stack([s[1] for s in samples])}


class Model(torch.nn.Module):
    def __init__(self, dropout=0.0):
        super().__init__()
        torch.manual_seed(1)
        self.encoder = torch.nn.Linear(4, 16)
        self.dropout = torch.nn.Dropout(dropout)
        self.head = torch.nn.Linear(16, 2)
        self.frozen = torch.nn.Linear(2, 2)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.head(self.dropout(torch.tanh(self.encoder(x)))))


class LossFn:
    """MSE; optionally raises (a crash) or returns NaN at a given call."""

    def __init__(self, crash_at_call=None, nan_at_call=None):
        self.calls = 0
        self.crash_at_call = crash_at_call
        self.nan_at_call = nan_at_call

    def __call__(self, model, batch):
        self.calls += 1
        if self.calls == self.crash_at_call:
            raise SimulatedCrash(f"crash in call {self.calls}")
        err = model(batch["x"]) - batch["y"]
        loss = (err**2).mean()
        if self.calls == self.nan_at_call:
            loss = loss * float("nan")
        return loss, {"mae": err.abs().mean()}


def _cfg(out, **kw):
    base = dict(
        output_dir=str(out),
        max_steps=6,
        per_device_train_batch_size=4,
        learning_rate=0.02,
        lr_scheduler_type="constant",
        save_steps=0,
        logging_steps=1,
        disable_tqdm=True,
        report_to="none",
    )
    base.update(kw)
    return TrainConfig(**base)


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _log_losses(out):
    return [json.loads(line)["loss"] for line in (Path(out) / "train_log.jsonl").read_text().splitlines()]


def test_loss_goes_down_and_frozen_params_stay_bit_identical(tmp_path):
    model = Model()
    before = _weights(model)
    result = train(model, _dataset(16), _collate, LossFn(), _cfg(tmp_path, max_steps=60, learning_rate=0.05))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 60
    assert sum(losses[-5:]) / 5 < 0.1 * sum(losses[:5]) / 5
    after = model.state_dict()
    assert torch.equal(before["frozen.weight"], after["frozen.weight"])
    assert torch.equal(before["frozen.bias"], after["frozen.bias"])
    assert not torch.equal(before["encoder.weight"], after["encoder.weight"])
    assert not torch.equal(before["head.bias"], after["head.bias"])


def test_exact_resume_after_crash_equals_uninterrupted_run(tmp_path):
    # Dropout (RNG), gradient accumulation, and an epoch boundary inside the resumed part all must line up:
    # 32 samples / (4 x 2) = 4 steps per epoch, crash in step 4, resume from step 3.
    cfg = dict(max_steps=6, gradient_accumulation_steps=2, save_steps=3, lr_scheduler_type="cosine", warmup_steps=2)
    straight = Model(dropout=0.2)
    result = train(straight, _dataset(), _collate, LossFn(), _cfg(tmp_path / "a", **cfg))
    straight_losses = [h["loss"] for h in result.history]

    crashed = Model(dropout=0.2)
    with pytest.raises(SimulatedCrash):
        train(crashed, _dataset(), _collate, LossFn(crash_at_call=2 * 3 + 2), _cfg(tmp_path / "b", **cfg))
    assert find_latest_checkpoint(tmp_path / "b").name == "step-3"

    resumed = Model(dropout=0.2)  # fresh process: weights come from the checkpoint
    result = train(resumed, _dataset(), _collate, LossFn(), _cfg(tmp_path / "b", resume_from_checkpoint="latest", **cfg))
    assert result.resumed_from.name == "step-3"
    assert [h["step"] for h in result.history] == [4, 5, 6]
    assert [h["loss"] for h in result.history] == straight_losses[3:]  # exact, not approximate
    assert _log_losses(tmp_path / "b") == straight_losses  # the log has no duplicate/partial steps
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_crash_mid_save_keeps_previous_checkpoint_loadable(tmp_path):
    saves = []

    def on_save(directory):
        saves.append(directory)
        (directory / "weights.bin").write_bytes(b"partial")
        if len(saves) == 2:  # the step-4 checkpoint: die halfway through writing it
            raise SimulatedCrash("killed while saving")
        (directory / "done.txt").write_text("ok")

    with pytest.raises(SimulatedCrash):
        train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, save_steps=2), on_save=on_save)
    checkpoints = tmp_path / "checkpoints"
    assert not (checkpoints / "step-4").exists()
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step-2"
    assert (latest / "model" / "done.txt").read_text() == "ok"

    # The half-written temporary directory is ignored and cleaned; the run resumes from step 2 and finishes.
    resumed = Model()
    result = train(resumed, _dataset(), _collate, LossFn(), _cfg(tmp_path, save_steps=2, resume_from_checkpoint="latest"))
    assert result.resumed_from.name == "step-2"
    assert result.global_step == 6
    assert not list(checkpoints.glob(".tmp-*"))
    reference = Model()
    train(reference, _dataset(), _collate, LossFn(), _cfg(tmp_path / "ref"))
    for key, value in reference.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_atomic_directory_keeps_old_content_when_writing_fails(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("v1")
    with pytest.raises(SimulatedCrash), atomic_directory(target) as tmp:
        (tmp / "a.txt").write_text("v2-partial")
        raise SimulatedCrash()
    assert (target / "a.txt").read_text() == "v1"
    with atomic_directory(target) as tmp:
        (tmp / "b.txt").write_text("v2")
    assert sorted(p.name for p in target.iterdir()) == ["b.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or old copies left


def test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint(tmp_path):
    model = Model()
    with pytest.raises(NonFiniteLossError, match=r"step 5\b.*step-4"):
        train(model, _dataset(), _collate, LossFn(nan_at_call=5), _cfg(tmp_path, save_steps=2, save_total_limit=1))
    assert all(torch.isfinite(p).all() for p in model.parameters())  # the NaN step did not touch the weights
    latest = find_latest_checkpoint(tmp_path)
    assert latest.name == "step-4"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-4"]  # save_total_limit=1
    with safe_open(str(latest / "accelerate" / "model.safetensors"), framework="pt") as fh:
        assert all(torch.isfinite(fh.get_tensor(k)).all() for k in fh.keys())
    assert len(_log_losses(tmp_path)) == 4  # only the finite steps were logged


def test_gradient_accumulation_matches_full_batch(tmp_path):
    full = Model()
    r_full = train(full, _dataset(), _collate, LossFn(), _cfg(tmp_path / "full", per_device_train_batch_size=8))
    accum = Model()
    r_accum = train(
        accum,
        _dataset(),
        _collate,
        LossFn(),
        _cfg(tmp_path / "acc", per_device_train_batch_size=4, gradient_accumulation_steps=2),
    )
    assert [h["loss"] for h in r_accum.history] == pytest.approx([h["loss"] for h in r_full.history], rel=1e-5)
    for key, value in full.state_dict().items():
        torch.testing.assert_close(accum.state_dict()[key], value, rtol=1e-5, atol=1e-6)


def test_param_groups_get_their_own_learning_rates(tmp_path):
    model = Model()
    groups = [
        {"name": "encoder", "params": list(model.encoder.parameters())},
        {"name": "head", "params": list(model.head.parameters()), "lr": 0.5},
    ]
    cfg = _cfg(tmp_path, max_steps=2, learning_rate=0.01, lr_groups={"encoder": 0.003})
    record = train(model, _dataset(), _collate, LossFn(), cfg, param_groups=groups).history[-1]
    assert record["lr/encoder"] == pytest.approx(0.003)
    assert record["lr/head"] == pytest.approx(0.5)

    with pytest.raises(ConfigError, match=r"'mapper'.*\['encoder', 'head'\]"):
        train(
            Model(),
            _dataset(),
            _collate,
            LossFn(),
            _cfg(tmp_path / "x", lr_groups={"mapper": 1.0}),
            param_groups=groups,
        )
    missing = [{"name": "encoder", "params": list(model.encoder.parameters())}]
    with pytest.raises(ValueError, match="no parameter group"):
        train(model, _dataset(), _collate, LossFn(), _cfg(tmp_path / "y"), param_groups=missing)


def test_checkpoint_holds_only_trainable_weights_and_final_dir_is_written(tmp_path):
    def on_save(directory):
        (directory / "marker.txt").write_text("model artifacts")

    result = train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, save_steps=3), on_save=on_save)
    with safe_open(str(result.last_checkpoint / "accelerate" / "model.safetensors"), framework="pt") as fh:
        assert sorted(fh.keys()) == ["encoder.bias", "encoder.weight", "head.bias", "head.weight"]
    assert (tmp_path / "final" / "marker.txt").read_text() == "model artifacts"
    assert (tmp_path / "checkpoints" / "step-3" / "model" / "marker.txt").is_file()


def test_resume_refuses_a_different_batch_layout(tmp_path):
    train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, max_steps=2))
    with pytest.raises(ConfigError, match="per_device_train_batch_size: checkpoint 4 vs now 8"):
        train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, per_device_train_batch_size=8, resume_from_checkpoint="latest"))
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, resume_from_checkpoint=str(tmp_path / "nope")))


def test_dataset_smaller_than_one_step_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="3 samples, fewer than one optimizer step"):
        train(Model(), _dataset(3), _collate, LossFn(), _cfg(tmp_path))


def test_tensorboard_events_are_written(tmp_path):
    train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, max_steps=2, report_to="tensorboard"))
    assert list((tmp_path / "logs").rglob("events.out.tfevents.*"))


def test_epoch_sampler_depends_only_on_seed_and_epoch():
    a, b = EpochSampler(10, seed=3, multiple=4), EpochSampler(10, seed=3, multiple=4)
    b.set_epoch(1)
    first_b = list(b)
    b.set_epoch(0)
    assert list(a) == list(b)  # same (seed, epoch) -> same order, whatever happened before
    assert len(list(a)) == 8 and len(set(a)) == 8  # cut to whole steps, no repeats
    assert first_b != list(a)
    assert list(EpochSampler(10, seed=4, multiple=4)) != list(a)


def test_logged_window_reads_position_at_its_last_step(tmp_path, caplog):
    # 32 samples / batch 4 = 8 steps per epoch; the line logged at step 4 averages the loss over steps 1-4 but gives
    # the epoch and learning rate at step 4 (still in the linear warmup), not their window means.
    cfg = _cfg(tmp_path, max_steps=8, logging_steps=4, lr_scheduler_type="linear", warmup_steps=6, learning_rate=0.02)
    with caplog.at_level("INFO", logger="vlm_chat.training.engine"):
        history = train(Model(), _dataset(), _collate, LossFn(), cfg).history
    line = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("step 4/8"))
    history = history[:4]
    assert "epoch=0.5 " in line
    assert f"loss={sum(h['loss'] for h in history) / 4:.4g}" in line
    (lr_key,) = [k for k in history[-1] if k.startswith("lr/")]
    assert history[0][lr_key] < history[-1][lr_key]  # still warming up, so a window mean would be lower
    assert f"{lr_key}={history[-1][lr_key]:.4g}" in line


def test_num_epochs_sets_the_step_count(tmp_path):
    result = train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, max_steps=-1, num_train_epochs=1.5))
    assert result.global_step == math.ceil(1.5 * 32 / 4)


def test_bf16_autocast_runs_and_is_removed_afterwards(tmp_path):
    model = Model()
    result = train(model, _dataset(), _collate, LossFn(), _cfg(tmp_path, mixed_precision="bf16", max_steps=3))
    assert all(math.isfinite(h["loss"]) for h in result.history)
    assert model(torch.randn(2, 4)).dtype == torch.float32  # accelerate's autocast wrapper is gone
    assert "_original_forward" not in model.__dict__


class _Died(BaseException):
    """A process death at a filesystem call: nothing after it runs, no cleanup."""


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_atomic_directory_survives_death_at_every_filesystem_step(tmp_path, monkeypatch, exchange):
    import os
    import shutil

    import vlm_chat.atomic as engine  # the atomic-directory helpers live here

    if not exchange:
        monkeypatch.setattr(engine, "_exchange", lambda a, b: False)

    def write(target, version):
        with atomic_directory(target) as tmp:
            (tmp / "weights.txt").write_text(version)

    def die_at(n):
        calls, dead = [], []
        real = {"replace": os.replace, "rmtree": shutil.rmtree}

        def wrap(name, owner):
            def call(*args, **kwargs):
                if dead:
                    return None
                calls.append(name)
                if len(calls) == n:
                    dead.append(True)
                    raise _Died(name)
                return real[name](*args, **kwargs)

            monkeypatch.setattr(owner, name, call)

        wrap("replace", os)
        wrap("rmtree", shutil)
        return calls

    probe = tmp_path / "probe" / "final"
    write(probe, "v1")
    calls = die_at(10**9)
    write(probe, "v2")
    points = len(calls)
    monkeypatch.undo()
    if not exchange:
        monkeypatch.setattr(engine, "_exchange", lambda a, b: False)
    assert points >= (1 if exchange else 3)
    for n in range(1, points + 1):
        target = tmp_path / f"kill{n}" / "final"
        write(target, "v1")
        die_at(n)
        with pytest.raises(_Died):
            write(target, "v2")
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(engine, "_exchange", lambda a, b: False)
        engine.recover(target)  # what the next save (or run) does first
        assert (target / "weights.txt").read_text() in ("v1", "v2"), f"death at filesystem call {n} of {points}"
        write(target, "v3")  # and saving works again over the leftovers
        assert (target / "weights.txt").read_text() == "v3"
        assert [p.name for p in target.parent.iterdir()] == ["final"]


def test_length_grouped_sampler_cuts_padding_and_stays_deterministic():
    lengths = [int(x) for x in torch.randint(10, 500, (256,), generator=torch.Generator().manual_seed(0))]
    plain = EpochSampler(256, seed=1, multiple=8)
    grouped = EpochSampler(256, seed=1, multiple=8, lengths=lengths, group=8)
    order = list(grouped)
    assert sorted(order) == sorted(plain)  # the same samples, each once
    assert order == list(EpochSampler(256, seed=1, multiple=8, lengths=lengths, group=8))  # exact resume needs this

    def padded(o):  # tokens computed when every batch is padded to its longest sample
        return sum(8 * max(lengths[i] for i in o[k : k + 8]) for k in range(0, len(o), 8))

    assert padded(order) < 0.8 * padded(list(plain))
    grouped.set_epoch(1)
    assert list(grouped) != order
    with pytest.raises(ValueError, match="lengths"):
        EpochSampler(10, seed=0, lengths=[1, 2])


@pytest.mark.parametrize("max_steps", [3, 8])
def test_samples_in_run_are_exactly_the_samples_training_draws(tmp_path, max_steps):
    from vlm_chat.training.sampler import samples_in_run

    drawn = []

    def collate(samples):
        drawn.extend(i for _, _, i in samples)
        return _collate(samples)

    # 30 samples, batch 4: 7 steps per epoch (2 samples left out of each); 8 steps cross into a second epoch.
    data = [(x, y, i) for i, (x, y) in enumerate(_dataset(30))]
    train(Model(), data, collate, LossFn(), _cfg(tmp_path, max_steps=max_steps, seed=3))
    trained = drawn[: 4 * max_steps]  # accelerate also prefetches the batch after the last step
    assert sorted(set(trained)) == samples_in_run(30, seed=3, samples_per_step=4, max_steps=max_steps)


# ------------------------------------------------------------------------------------------ signals, clocks, refusals


class SignalAt(LossFn):
    """MSE whose loss call number ``at`` first delivers ``signum`` to this process (``times`` times), as ``kill``
    would while the step runs."""

    def __init__(self, signum, at, times=1, group=False):
        super().__init__()
        self.signum, self.at, self.times, self.group = signum, at, times, group

    def __call__(self, model, batch):
        import multiprocessing
        import os

        if self.calls + 1 == self.at:
            # group: also the DataLoader workers, as a scheduler or Ctrl-C signals the whole process group
            pids = [os.getpid(), *([c.pid for c in multiprocessing.active_children()] if self.group else [])]
            assert len(pids) > 1 or not self.group, "no DataLoader worker to signal"
            for _ in range(self.times):
                for pid in pids:
                    os.kill(pid, self.signum)
        return super().__call__(model, batch)


@pytest.fixture
def python_sigint():
    """Python's own SIGINT handler for the test: a job started in the background (``cmd &``) inherits SIGINT ignored,
    and the engine leaves an ignored signal ignored."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("signame, code, workers", [("SIGTERM", 143, 0), ("SIGINT", 130, 0), ("SIGTERM", 143, 1)],
                         ids=["SIGTERM", "SIGINT", "SIGTERM-to-the-dataloader-worker-too"])
def test_a_stop_signal_finishes_the_step_saves_and_resume_is_exact(tmp_path, signame, code, workers,
                                                                   python_sigint):
    """SIGTERM/SIGINT in the first micro-batch of step 3 (accumulation 2): the step still completes, a checkpoint
    step-3 is written, TrainingInterrupted (a SystemExit with the shell's code) is raised; the handlers are put back;
    a resume ends with the weights and losses of a run that was never interrupted. A DataLoader worker that gets the
    signal too (a process-group signal) ignores it, so the step it is loading for still completes."""
    import signal

    from vlm_chat.training.engine import TrainingInterrupted

    cfg = dict(max_steps=6, gradient_accumulation_steps=2, save_steps=0, lr_scheduler_type="cosine", warmup_steps=2)
    straight = Model(dropout=0.2)
    expected = [h["loss"] for h in train(straight, _dataset(), _collate, LossFn(), _cfg(tmp_path / "a", **cfg)).history]

    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    stopped = Model(dropout=0.2)
    with pytest.raises(TrainingInterrupted, match=rf"stopped by {signame} after step 3; checkpoint .*step-3") as info:
        train(stopped, _dataset(), _collate, SignalAt(getattr(signal, signame), at=2 * 2 + 1, group=bool(workers)),
              _cfg(tmp_path / "b", dataloader_num_workers=workers, **cfg))
    assert info.value.code == code and info.value.step == 3 and info.value.checkpoint.name == "step-3"
    assert {s: signal.getsignal(s) for s in before} == before
    assert find_latest_checkpoint(tmp_path / "b").name == "step-3"
    assert not (tmp_path / "b" / "final").exists()

    resumed = Model(dropout=0.2)
    cfg_b = _cfg(tmp_path / "b", resume_from_checkpoint="latest", **cfg)
    result = train(resumed, _dataset(), _collate, LossFn(), cfg_b)
    assert result.resumed_from.name == "step-3"
    assert _log_losses(tmp_path / "b") == expected
    for key, value in straight.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_a_second_signal_aborts_without_waiting_for_the_step(tmp_path, python_sigint):
    import signal

    with pytest.raises(KeyboardInterrupt):  # the previous SIGINT handler (Python's) came back and got the signal
        train(Model(), _dataset(), _collate, SignalAt(signal.SIGINT, at=4, times=2), _cfg(tmp_path, save_steps=2))
    assert find_latest_checkpoint(tmp_path).name == "step-2"  # the last complete checkpoint, none for step 4
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_save_every_minutes_checkpoints_at_step_boundaries_and_resume_is_exact(tmp_path, monkeypatch):
    """A clock where every loss call takes one minute: with save_every_minutes 2.5 and no save_steps the checkpoints
    fall at steps 3 and 6 (then the end, 8); resuming from the time-based step-3 checkpoint is exact."""
    import types

    import vlm_chat.training.engine as engine

    minutes = [0.0]

    class Slow(LossFn):
        def __call__(self, model, batch):
            minutes[0] += 1
            return super().__call__(model, batch)

    fake_time = types.SimpleNamespace(monotonic=lambda: 60 * minutes[0], perf_counter=engine.time.perf_counter)
    monkeypatch.setattr(engine, "time", fake_time)
    cfg = dict(max_steps=8, save_steps=0, save_every_minutes=2.5, save_total_limit=0)
    timed = Model()
    expected = [h["loss"] for h in train(timed, _dataset(), _collate, Slow(), _cfg(tmp_path / "a", **cfg)).history]
    steps = sorted(int(p.name.split("-")[1]) for p in (tmp_path / "a" / "checkpoints").iterdir())
    assert steps == [3, 6, 8]

    resumed = Model()
    cfg_b = _cfg(tmp_path / "a", resume_from_checkpoint=str(tmp_path / "a" / "checkpoints" / "step-3"), **cfg)
    result = train(resumed, _dataset(), _collate, Slow(), cfg_b)
    assert [h["loss"] for h in result.history] == expected[3:]
    for key, value in timed.state_dict().items():
        assert torch.equal(value, resumed.state_dict()[key]), key


def test_an_inf_loss_stops_the_run_like_a_nan(tmp_path):
    class InfAt(LossFn):
        def __call__(self, model, batch):
            loss, metrics = super().__call__(model, batch)
            return (loss * float("inf") if self.calls == 5 else loss), metrics

    model = Model()
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(inf\) at step 5 .*last good checkpoint: .*step-4"):
        train(model, _dataset(), _collate, InfAt(), _cfg(tmp_path, save_steps=2))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert len(_log_losses(tmp_path)) == 4


class _InfGrad(torch.autograd.Function):
    """Identity forward, infinite gradient backward: a finite loss whose gradient overflowed."""

    @staticmethod
    def forward(ctx, x):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        return grad * float("inf")


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0], ids=["clipping", "no-clipping"])
def test_a_non_finite_gradient_norm_stops_the_run_before_the_update(tmp_path, max_grad_norm):
    """Loss finite, gradient inf at step 5: the run stops naming the gradient norm and step 5, with or without
    clipping, and the weights are those of step 4 (the step-4 checkpoint's)."""
    from safetensors.torch import load_file

    class InfGradAt(LossFn):
        def __call__(self, model, batch):
            self.calls += 1
            out = model(batch["x"])
            if self.calls == 5:
                out = _InfGrad.apply(out)
            return ((out - batch["y"]) ** 2).mean(), {}

    model = Model()
    with pytest.raises(NonFiniteLossError, match=r"non-finite gradient norm \((inf|nan)\) at step 5 .*step-4"):
        train(model, _dataset(), _collate, InfGradAt(), _cfg(tmp_path, save_steps=2, max_grad_norm=max_grad_norm))
    saved = load_file(str(tmp_path / "checkpoints" / "step-4" / "accelerate" / "model.safetensors"))
    for key, value in saved.items():
        assert torch.equal(model.state_dict()[key], value), key  # the update of step 5 never happened


@pytest.mark.parametrize("change, message", [
    ("seed", "seed: checkpoint 0 vs now 1"),
    ("accumulation", "gradient_accumulation_steps: checkpoint 1 vs now 2"),
    ("processes", "num_processes: checkpoint 2 vs now 1"),
    ("dataset-size", "dataset_size: checkpoint 32 vs now 40"),
    ("dataset-rows", "dataset_fingerprint: checkpoint aaaa vs now bbbb"),
])  # fmt: skip
def test_resume_refuses_another_data_order(tmp_path, change, message):
    """Each key that fixes the data order, changed between the checkpointed run and the resume, is refused by name.
    (A checkpoint from 2 processes is made by editing its state file: the test runs one process.)"""
    train(Model(), _dataset(), _collate, LossFn(), _cfg(tmp_path, max_steps=2), dataset_fingerprint="aaaa")
    cfg, data, fingerprint = {}, _dataset(), "aaaa"
    if change == "seed":
        cfg = {"seed": 1}
    elif change == "accumulation":
        cfg = {"gradient_accumulation_steps": 2}
    elif change == "processes":
        state_file = find_latest_checkpoint(tmp_path) / "trainer_state.json"
        state_file.write_text(json.dumps({**json.loads(state_file.read_text()), "num_processes": 2}))
    elif change == "dataset-size":
        data = _dataset(40)
    else:
        fingerprint = "bbbb"  # the same number of rows, other rows
    with pytest.raises(ConfigError, match=rf"cannot resume exactly from .*step-2.*{message}"):
        train(Model(), data, _collate, LossFn(), _cfg(tmp_path, resume_from_checkpoint="latest", **cfg),
              dataset_fingerprint=fingerprint)


def test_an_ignored_stop_signal_stays_ignored(tmp_path):
    """``nohup``/``cmd &`` runs with SIGINT ignored: the engine does not start honouring it (the run finishes)."""
    import signal

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        result = train(Model(), _dataset(), _collate, SignalAt(signal.SIGINT, at=3), _cfg(tmp_path))
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    finally:
        signal.signal(signal.SIGINT, previous)
    assert result.global_step == 6 and (tmp_path / "checkpoints" / "step-6").is_dir()
