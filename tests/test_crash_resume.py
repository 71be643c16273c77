"""Nothing lost: a training run killed with SIGKILL resumes to the same weights, bit for bit; a NaN stops a real stage
run naming the step and keeps the last good checkpoint; a crash at any point of a save leaves a loadable checkpoint.

Covered elsewhere and not repeated here (tests/test_engine.py, on a toy model in-process): exact resume after an
exception mid-step, a crash mid-checkpoint-write keeping the previous checkpoint, atomic_directory on an exception and
at every filesystem step (test_atomic_directory_survives_death_at_every_filesystem_step), and a NaN loss in the engine
loop. This file adds the real thing: the tiny VLM pipeline (``train/instruct.py``) in a separate process, killed by the
kernel at a step chosen at random; and the same death-at-every-step check for ``VLMChat.save_pretrained``.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training import load_stage_config, run_stage
from vlm_chat.training.engine import NonFiniteLossError, find_latest_checkpoint

REPO = Path(__file__).resolve().parents[1]
MAX_STEPS, SAVE_STEPS = 10, 2


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_crash")
    write_shapes_dataset(out, 6, seed=5, image_size=32, pope_per_image=0, max_turns=2)
    return out


def _instruct_args(output_dir: Path, shapes_dir: Path, vision: Path, lm: Path, **extra) -> list[str]:
    # 6 packed conversations, batch 2: 3 steps per epoch, so the run crosses two epoch boundaries.
    args = {"model.vision.name_or_path": vision, "model.lm.name_or_path": lm, "model.lm.max_length": 160,
            "model.lm.lora_r": 4, "model.lm.lora_dropout": 0.1, "train_file": shapes_dir / "conversations.json",
            "output_dir": output_dir, "max_steps": MAX_STEPS, "save_steps": SAVE_STEPS, "save_total_limit": 0,
            "per_device_train_batch_size": 2, "mapper_lr": 3e-3, "lora_lr": 3e-3,
            "logging_steps": 1, "report_to": "none", "disable_tqdm": "true", **extra}  # fmt: skip
    return [f"--{k}={v}" for k, v in args.items()]


def _start(args: list[str], log: Path) -> subprocess.Popen:
    # One thread per run: the two runs below share the machine without changing each other's arithmetic.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}  # fmt: skip
    return subprocess.Popen([sys.executable, str(REPO / "train" / "instruct.py"), *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip


def _logged_steps(output_dir: Path) -> list[dict]:
    path = output_dir / "train_log.jsonl"
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return rows


def _final_tensors(output_dir: Path) -> dict[str, torch.Tensor]:
    final = output_dir / "final"
    return {
        **{f"mapper/{k}": v for k, v in load_file(str(final / "mapper.safetensors")).items()},
        **{f"adapter/{k}": v for k, v in load_file(str(final / "adapter" / "adapter_model.safetensors")).items()},
    }


def _wait(proc: subprocess.Popen, log: Path, timeout: float = 400) -> None:
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, log.read_text()[-3000:]


def test_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(
    tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir
):
    """SIGKILL the tiny instruct pipeline at a random step after its first checkpoint; ``--resume latest`` finishes
    it; the final mapper and LoRA weights and every logged loss equal those of a run that was never interrupted.

    The kill step is random on purpose (the engine must not depend on where a crash lands, including mid-save); it is
    printed in every failure message, and ``VLM_CHAT_KILL_STEP`` replays a given one.
    """
    kill_at = int(os.environ.get("VLM_CHAT_KILL_STEP") or random.randint(SAVE_STEPS + 1, MAX_STEPS - 2))
    where = f"(killed at step >= {kill_at}; replay with VLM_CHAT_KILL_STEP={kill_at})"
    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    common = (shapes_dir, tiny_clip_dir, tiny_smollm2_dir)
    straight = _start(_instruct_args(straight_dir, *common), tmp_path / "straight.log")
    crashed = _start(_instruct_args(crashed_dir, *common), tmp_path / "crashed.log")

    deadline = time.monotonic() + 400
    while crashed.poll() is None and time.monotonic() < deadline:
        if len(_logged_steps(crashed_dir)) >= kill_at and find_latest_checkpoint(crashed_dir) is not None:
            crashed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert crashed.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it could be killed {where}"
    steps_done = len(_logged_steps(crashed_dir))
    latest = find_latest_checkpoint(crashed_dir)
    assert not (crashed_dir / "final").exists() and steps_done < MAX_STEPS, where
    assert latest is not None and int(latest.name.split("-")[1]) <= steps_done, where

    resumed_log = tmp_path / "resumed.log"
    resumed = _start(_instruct_args(crashed_dir, *common, resume_from_checkpoint="latest"), resumed_log)
    _wait(resumed, resumed_log)
    _wait(straight, tmp_path / "straight.log")
    assert f"resumed from {latest}" in resumed_log.read_text(), where

    expected, got = _logged_steps(straight_dir), _logged_steps(crashed_dir)
    assert [r["step"] for r in got] == list(range(1, MAX_STEPS + 1)), where  # no step lost, none logged twice
    assert [r["loss"] for r in got] == [r["loss"] for r in expected], where
    want, have = _final_tensors(straight_dir), _final_tensors(crashed_dir)
    assert set(have) == set(want), where
    different = [k for k in want if not torch.equal(want[k], have[k])]
    assert different == [], f"{len(different)} tensors differ, e.g. {different[:3]} {where}"
    assert any("lora_B" in k and torch.count_nonzero(v) for k, v in have.items())  # LoRA really trained


def _nan_at_call(original, n: int):
    """A VLMModel.forward whose n-th training call returns a NaN loss (a bad batch, an overflow)."""
    calls = []

    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        if out.loss is not None:
            calls.append(1)
            if len(calls) == n:
                out.loss = out.loss * float("nan")
        return out

    return forward


def test_nan_loss_in_a_real_stage_run_names_the_step_and_keeps_the_last_good_checkpoint(
    tmp_path, shapes_dir, tiny_clip_dir, tiny_smollm2_dir, monkeypatch, caplog
):
    """nanoVLM #165 ("loss is nan", training went on printing NaN for thousands of batches): through the real
    instruct stage, a NaN loss at step 5 stops the run with an error naming step 5 and the last good checkpoint
    (step 4), before the NaN reaches the weights; that checkpoint loads as a chat model and the run resumes from it.

    The engine's own NaN test (tests/test_engine.py::test_nan_loss_stops_naming_the_step_and_keeps_last_good_checkpoint)
    uses a toy model; this one goes through the stage, its checkpoint layout and VLMChat.from_pretrained.
    """
    from vlm_chat.model import VLMModel

    out = tmp_path / "run"
    args = _instruct_args(out, shapes_dir, tiny_clip_dir, tiny_smollm2_dir, max_steps=6, **{"model.lm.lora_dropout": 0.0})
    monkeypatch.setattr(VLMModel, "forward", _nan_at_call(VLMModel.forward, n=5))
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss \(nan\) at step 5 .*last good checkpoint: .*step-4"):
        run_stage(load_stage_config("instruct", argv=args))
    monkeypatch.undo()

    assert [r["step"] for r in _logged_steps(out)] == [1, 2, 3, 4]  # the NaN step was not logged as a result
    assert not (out / "final").exists()
    latest = find_latest_checkpoint(out)
    assert latest.name == "step-4"
    chat = VLMChat.from_pretrained(latest / "model", device="cpu")
    assert all(torch.isfinite(p).all() for p in chat.model.parameters())
    assert chat.generate(shapes_dir / "images" / "shapes_5_0.png", "What shapes are there?", max_new_tokens=3)

    result = run_stage(load_stage_config("instruct", argv=[*args, "--resume_from_checkpoint=latest"]))
    assert result.resumed_from.name == "step-4" and result.global_step == 6
    assert (out / "final" / "mapper.safetensors").is_file()


# ------------------------------------------------------------------------------------------------- crash mid-save


class _Killed(BaseException):
    """The process dying: not an Exception, so no ``except Exception`` in the code under test can swallow it."""


def _die_at(monkeypatch, n: int) -> list[str]:
    """Make the n-th filesystem move/delete "kill the process": it raises _Killed instead of happening, and from then
    on nothing is cleaned up (a dead process runs no ``finally`` that touches the disk)."""
    import shutil

    calls: list[str] = []
    dead = []
    real = {"replace": os.replace, "rename": os.rename, "rmtree": shutil.rmtree, "move": shutil.move}

    def wrap(name):
        def fs_call(*args, **kwargs):
            if dead:
                return None
            calls.append(name)
            if len(calls) == n:
                dead.append(True)
                raise _Killed(f"killed at {name}{args}")
            return real[name](*args, **kwargs)

        return fs_call

    for name in ("replace", "rename"):
        monkeypatch.setattr(os, name, wrap(name))
    for name in ("rmtree", "move"):
        monkeypatch.setattr(shutil, name, wrap(name))
    return calls


@pytest.fixture(scope="module")
def tiny_chat(tiny_clip_dir, tiny_llama_dir):
    return VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu")


@pytest.fixture(params=[True, False], ids=["renameat2", "two-renames"])
def exchange(request, monkeypatch):
    """Run with the atomic exchange (Linux) and with the portable fallback (move aside, then rename, recover on load)."""
    import vlm_chat.atomic

    if not request.param:
        monkeypatch.setattr(vlm_chat.atomic, "_exchange", lambda a, b: False)
    return request.param


def _chat_kill_points(tiny_chat, tmp_path, monkeypatch, exchange):
    """Yield (n, points, path) with a checkpoint at ``path`` whose re-save was killed at filesystem call n."""
    import vlm_chat.atomic

    def undo():
        monkeypatch.undo()
        if not exchange:
            monkeypatch.setattr(vlm_chat.atomic, "_exchange", lambda a, b: False)

    def fresh(n: int) -> Path:  # a directory of its own per kill point: a dead process's leftovers stay there
        path = tmp_path / f"kill{n}" / "ckpt"
        tiny_chat.save_pretrained(path)
        return path

    path = fresh(0)
    calls = _die_at(monkeypatch, n=10**9)
    tiny_chat.save_pretrained(path)
    points = len(calls)
    undo()
    assert points >= (1 if exchange else 3)
    for n in range(1, points + 1):
        path = fresh(n)
        _die_at(monkeypatch, n)
        with pytest.raises(_Killed):
            tiny_chat.save_pretrained(path)
        undo()
        yield n, points, path


def test_a_crash_at_any_point_of_save_pretrained_leaves_a_loadable_checkpoint(
    tiny_chat, tmp_path, monkeypatch, exchange
):
    """save_pretrained (the demo model, export) used to replace a directory with two renames: a crash between them
    left nothing at the checkpoint's path. Found by this test; now vlm_chat.atomic (exchange, or recovery on load)."""
    lost = []
    for n, points, path in _chat_kill_points(tiny_chat, tmp_path, monkeypatch, exchange):
        try:
            VLMChat.from_pretrained(path, device="cpu")
        except (FileNotFoundError, ValueError) as e:
            lost.append(f"killed at move/delete {n} of {points}: {e}")
    assert lost == []


def test_save_pretrained_works_again_after_a_crash_mid_save(tiny_chat, tmp_path, monkeypatch, exchange):
    """The restarted process (same PID, as PID 1 in a container) saves over the crashed save's leftovers (a leftover
    .name.old-PID used to make every later save fail with "Directory not empty")."""
    failed = []
    for n, points, path in _chat_kill_points(tiny_chat, tmp_path, monkeypatch, exchange):
        try:
            tiny_chat.save_pretrained(path)
            VLMChat.from_pretrained(path, device="cpu")
        except OSError as e:
            failed.append(f"killed at move/delete {n} of {points}, then: {e}")
    assert failed == []
