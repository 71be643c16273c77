"""QLoRA for real: the instruct stage with the LLM in 4-bit NF4 (bitsandbytes' CPU kernels) trains, saves, reloads and
answers as before the save; killed with SIGKILL mid-run it resumes to the same weights, bit for bit.

bitsandbytes quantizes in blocks of 64 input features on CPU: the tiny Llama here has hidden size 64 (intermediate
128), the smallest that quantizes every linear layer (``tests/test_model.py::test_qlora_builds_and_steps_on_cpu``).
"""

from __future__ import annotations

import os
import random
import signal

import pytest
import torch
from test_crash_resume import (  # the stage-script harness (same tests/ folder)
    MAX_STEPS,
    SAVE_STEPS,
    _assert_same_run,
    _logged_steps,
    _stage_args,
    _start,
    _stop_at_step,
    _wait,
)

from vlm_chat import VLMChat
from vlm_chat.datasets.shapes import write_shapes_dataset
from vlm_chat.training import load_stage_config, run_stage
from vlm_chat.training.engine import find_latest_checkpoint

bnb = pytest.importorskip("bitsandbytes")

GEN = {"max_new_tokens": 8, "min_new_tokens": 8}  # fixed length: compare real tokens, not empty strings
QUESTIONS = ("What shapes are there?", "How many shapes are there?")


@pytest.fixture(scope="module")
def nf4_llama_dir(tmp_path_factory, tokenizer_factory):
    """A 2-layer Llama (hidden 64: NF4 blocks of 64 fit) with SmolLM2's tokenizer and chat template."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    tok = tokenizer_factory("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), max_position_embeddings=512, initializer_range=0.3,
                      tie_word_embeddings=True)
    path = tmp_path_factory.mktemp("nf4_llama")
    AutoModelForCausalLM.from_config(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def shapes_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes_qlora")
    write_shapes_dataset(out, 6, seed=5, image_size=32, pope_per_image=0, max_turns=2)
    return out


def _quantized_weights(chat: VLMChat) -> dict[str, torch.Tensor]:
    """The packed NF4 base weights (uint8) of every 4-bit layer."""
    return {n: m.weight.detach().clone() for n, m in chat.model.lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)}


def test_qlora_instruct_trains_saves_reloads_and_answers_as_before(tmp_path, shapes_dir, tiny_clip_dir, nf4_llama_dir,
                                                                   monkeypatch):
    """4 steps of the instruct stage on a 4-bit base: the LoRA and mapper train, the NF4 weights do not change; the
    saved checkpoint reloads in 4-bit and answers each question greedily with the same tokens as the trained model
    in memory."""
    import vlm_chat.training.stages as stages

    built, packed_at_start = [], {}
    real_build = stages.build_chat

    def build_chat(config):  # the stage's own model, kept for the comparison (and its NF4 weights before training)
        built.append(real_build(config))
        packed_at_start.update(_quantized_weights(built[-1]))
        return built[-1]

    monkeypatch.setattr(stages, "build_chat", build_chat)
    config = load_stage_config("instruct", overrides={
        "model.vision.name_or_path": str(tiny_clip_dir), "model.lm.name_or_path": str(nf4_llama_dir),
        "model.lm.load_in_4bit": True, "model.lm.lora_r": 4, "model.lm.max_length": 160,
        "train_file": str(shapes_dir / "conversations.json"), "output_dir": str(tmp_path / "run"), "max_steps": 4,
        "save_steps": 2, "per_device_train_batch_size": 2, "mapper_lr": 3e-3, "lora_lr": 3e-3, "report_to": "none",
        "disable_tqdm": True, "logging_steps": 1,
    })  # fmt: skip
    result = run_stage(config)
    (chat,) = built
    assert chat.config.lm.load_in_4bit
    assert _quantized_weights(chat), "no 4-bit layer: the LLM was not quantized"
    assert {m.weight.quant_type for m in chat.model.lm.modules() if isinstance(m, bnb.nn.Linear4bit)} == {"nf4"}
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history) and result.global_step == 4

    # What training touched: LoRA (lora_B starts at zero) and the mapper; not the NF4 base.
    after_training = _quantized_weights(chat)
    assert after_training.keys() == packed_at_start.keys()
    assert all(torch.equal(w, packed_at_start[n]) for n, w in after_training.items())
    trained_b = [p for n, p in chat.model.named_parameters() if "lora_B" in n and "default" in n]
    assert trained_b and all(torch.count_nonzero(p) for p in trained_b)

    chat.model.eval()
    image = shapes_dir / "images" / "shapes_5_0.png"
    before = [chat.generate(image, q, **GEN) for q in QUESTIONS]
    reloaded = VLMChat.from_pretrained(result.final_dir, device="cpu")
    assert reloaded.config.lm.load_in_4bit and _quantized_weights(reloaded)
    after = [reloaded.generate(image, q, **GEN) for q in QUESTIONS]
    assert after == before
    assert all(before), before
    saved = dict(reloaded.model.named_parameters())
    for name, param in chat.model.named_parameters():
        if param.requires_grad:
            assert torch.equal(saved[name].detach(), param.detach()), name


@pytest.mark.slow
def test_qlora_sigkill_at_a_random_step_then_resume_equals_an_uninterrupted_run(tmp_path, shapes_dir, tiny_clip_dir,
                                                                                nf4_llama_dir):
    """``train/instruct.py`` with ``model.lm.load_in_4bit: true``, killed with SIGKILL at a random step after its
    first checkpoint, resumes (the base is quantized again from the same weights) to the bit-identical losses and
    LoRA/mapper weights of an uninterrupted run."""
    env = {"shapes": shapes_dir, "clip": tiny_clip_dir, "lm": None, "lm4bit": nf4_llama_dir}
    kill_at = int(os.environ.get("VLM_CHAT_KILL_STEP") or random.randint(SAVE_STEPS + 1, MAX_STEPS - 2))
    where = f"(killed at step >= {kill_at}; replay with VLM_CHAT_KILL_STEP={kill_at})"
    straight_dir, crashed_dir = tmp_path / "straight", tmp_path / "crashed"
    straight = _start("instruct-qlora", _stage_args("instruct-qlora", straight_dir, env), tmp_path / "straight.log")
    crashed = _start("instruct-qlora", _stage_args("instruct-qlora", crashed_dir, env), tmp_path / "crashed.log")
    _stop_at_step(crashed, crashed_dir, kill_at, signal.SIGKILL, checkpoint=True)
    assert crashed.wait(timeout=60) == -signal.SIGKILL, f"the run ended before it could be killed {where}"
    assert len(_logged_steps(crashed_dir)) < MAX_STEPS and find_latest_checkpoint(crashed_dir) is not None, where

    resumed_log = tmp_path / "resumed.log"
    resumed = _start("instruct-qlora", _stage_args("instruct-qlora", crashed_dir, env, resume_from_checkpoint="latest"),
                     resumed_log)
    _wait(resumed, resumed_log)
    _wait(straight, tmp_path / "straight.log")
    assert "resumed from" in resumed_log.read_text(), where
    _assert_same_run(straight_dir, crashed_dir, where, trains_lora=True)
