"""The training data readers on hostile rows (decompression bombs, path escapes, symlinked folders) and the label and
truncation failures other projects had (LLaVA #661 / #1166 / #1706, transformers #36002) as regression tests.

tests/test_data.py covers each reader's bad-row catalogue in detail; these go through the stages' own loader.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from reliability.inputs import make_png, write_jsonl
from vlm_chat import VLMChat
from vlm_chat.prompting import IGNORE_INDEX


def test_data_reader_refuses_a_decompression_bomb_row_without_decoding_it(tmp_path, files):
    from vlm_chat.data import DataError, load_captions

    folder = tmp_path / "img"
    folder.mkdir()
    shutil.copy(files["bomb"], folder / "bomb.png")
    make_png(folder / "ok.png")
    path = write_jsonl(
        tmp_path / "caps.jsonl", [{"image": "ok.png", "caption": "a scene"}, {"image": "bomb.png", "caption": "boom"}]
    )
    with pytest.raises(DataError, match=r"caps\.jsonl, row 1 .*9000x9000 pixels.*\[unreadable_image\]"):
        load_captions(path, folder)
    ds, report = load_captions(path, folder, skip_bad_rows=True)
    assert len(ds) == 1 and report.counts == {"unreadable_image": 1}


def test_data_reader_follows_a_symlinked_image_folder(tmp_path):
    """A symlinked image folder is where its images live: its own images are inside it, not escapes."""
    from vlm_chat.data import load_conversations

    real = tmp_path / "real_images"
    real.mkdir()
    make_png(real / "a.png")
    (tmp_path / "link").symlink_to(real, target_is_directory=True)
    row = {"image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]}
    ds, report = load_conversations(write_jsonl(tmp_path / "c.jsonl", [row]), tmp_path / "link")
    assert len(ds) == 1 and report.skipped == 0 and ds[0]["image"] == str((real / "a.png").resolve())



def test_dataset_image_paths_cannot_leave_their_folder_in_any_stage(tmp_path, monkeypatch):
    """Through the stages' own loader (pack_by_image included): escapes are bad rows, never opened.

    tests/test_data.py checks each reader's escape rules (``..``, absolute, symlink) in detail.
    """
    from vlm_chat import data
    from vlm_chat.data import DataError
    from vlm_chat.training.stages import DataArgs, load_rows

    folder = tmp_path / "images"
    folder.mkdir()
    make_png(folder / "ok.png")
    secret = make_png(tmp_path / "secret.png")
    (folder / "link.png").symlink_to(secret)
    escapes = ["../secret.png", str(secret), "link.png", "./../images/../secret.png"]
    conv = [{"from": "human", "value": "<image>\nQ"}, {"from": "gpt", "value": "A"}]
    rows = {
        "instruct": [{"image": p, "conversations": conv} for p in ["ok.png", *escapes]],
        "pretrain": [{"image": p, "caption": "a scene"} for p in ["ok.png", *escapes]],
        "dpo": [{"images": [p], "prompt": "<image>\nQ", "chosen": "A", "rejected": "B"} for p in ["ok.png", *escapes]],
    }
    opened = []
    real_open = Image.open
    monkeypatch.setattr(
        data.Image, "open", lambda fp, *a, **k: opened.append(Path(fp).resolve()) or real_open(fp, *a, **k)
    )
    for stage, stage_rows in rows.items():
        args = DataArgs(train_file=str(write_jsonl(tmp_path / f"{stage}.jsonl", stage_rows)), image_folder=str(folder))
        kept = load_rows(stage, args, skip_bad_rows=True)
        assert [Path(r["image"]).name for r in kept] == ["ok.png"], stage
        with pytest.raises(DataError, match=r"row 1 .*outside the image folder.*\[path_escape\]"):
            load_rows(stage, args, skip_bad_rows=False)
    assert secret.resolve() not in opened and opened


# ---------------------------------------------------------------------------------------------------------- anchors

VICUNA_V1 = (  # LLaVA-1.5's "v1" conversation (Vicuna), written as a chat template
    "{{ 'A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user\\'s questions.' }}"
    "{% for m in messages %}{% if m['role'] == 'user' %}{{ ' USER: ' + m['content'] }}"
    "{% else %}{{ ' ASSISTANT: ' + m['content'] + eos_token }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ ' ASSISTANT:' }}{% endif %}"
)


def _llava_v1_label_length(tokenizer, text: str, sep: str, sep2: str) -> int:
    """LLaVA's preprocess_v1 bookkeeping: the token count it believes ``text`` has, summed round by round.

    It splits the rendered conversation at ``sep2`` (``</s>``), tokenizes each round on its own and assumes the
    per-round lengths add up to the whole; when they do not, it masks the entire sample ("tokenization mismatch: X vs.
    Y (ignored)" and a loss of 0.0 in LLaVA #661, #1166, #1706).
    """
    cur_len = 1  # LLaVA skips one BOS token
    for rou in text.split(sep2):
        if rou == "":
            break
        cur_len += len(tokenizer(rou).input_ids)
    return cur_len


def test_anchor_label_masks_with_non_default_templates(tokenizer_factory):
    """LLaVA #661 / #1166 / #1706 ("tokenization mismatch", loss 0.0 on other LLMs' templates).

    On a Vicuna-v1 template with a BPE tokenizer, LLaVA's round-by-round length bookkeeping disagrees with the real
    tokenization, so LLaVA would have dropped this sample's labels. Ours come from the template's own rendering and
    decode to exactly each assistant answer, end-of-turn token included.
    """
    from tokenizers import AddedToken
    from transformers import CLIPImageProcessor

    from vlm_chat.prompting import VLMProcessor

    tok = tokenizer_factory("llama2")  # real SmolLM2 BPE vocabulary with <s> </s> as BOS/EOS
    tok.chat_template = VICUNA_V1
    tok.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    proc = VLMProcessor(tok, CLIPImageProcessor(), "<image>", 5, 512)
    answers = ["A red circle.", "There are 2 shapes: a red circle and a blue square.", "Yes."]
    messages = [
        {"role": "user", "content": "<image>\nWhat is it?"},
        {"role": "assistant", "content": answers[0]},
        {"role": "user", "content": "How many shapes?"},
        {"role": "assistant", "content": answers[1]},
        {"role": "user", "content": "Is one red?"},
        {"role": "assistant", "content": answers[2]},
    ]
    text = proc.render(messages, add_generation_prompt=False)
    total = len(tok(text, add_special_tokens=False).input_ids)
    assert _llava_v1_label_length(tok, text, " ASSISTANT: ", "</s>") != total  # LLaVA would mask the whole sample

    enc = proc.encode_conversation(messages, num_images=1)
    runs, run = [], []
    for label in enc.labels + [IGNORE_INDEX]:
        if label == IGNORE_INDEX:
            runs, run = (runs + [run] if run else runs), []
        else:
            run.append(label)
    assert [tok.decode(r[:-1]).strip() for r in runs] == answers
    assert all(r[-1] == tok.convert_tokens_to_ids("</s>") for r in runs)  # each answer learns to stop


def test_anchor_truncation_never_leaves_image_tokens_without_features(tiny_clip_dir, tiny_llama_dir, tmp_path):
    """transformers #36002 / TRL PR #5023: max_length cut part of the image placeholders while every image feature
    was kept ("Image features and image tokens do not match") and training crashed mid-run.

    Through the training collator: the sample whose image block would be cut is skipped whole; the batch that reaches
    the model has exactly N_vis image tokens per image and one feature block per image, and the forward pass runs.
    """
    from vlm_chat.training.stages import Collator, FeatureCache

    max_length = 48
    small = VLMChat.from_components(
        str(tiny_clip_dir), str(tiny_llama_dir), lm_config={"max_length": max_length}, device="cpu"
    )
    n_vis = small.config.num_image_tokens
    image = str(make_png(tmp_path / "scene.png"))
    short = [{"role": "user", "content": "<image>\nColour?"}, {"role": "assistant", "content": "Red."}]
    filler = "word " * 30
    late = [{"role": "user", "content": f"{filler}<image>\nColour?"}, {"role": "assistant", "content": "Red."}]
    # Precondition: untruncated, the late sample's image block straddles max_length.
    full = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu").processor
    ids = full.encode_conversation(late, num_images=1).input_ids
    positions = [i for i, t in enumerate(ids) if t == full.image_token_id]
    assert positions[0] < max_length <= positions[-1]

    collate = Collator(small, "instruct", FeatureCache(small, enabled=True))
    batch = collate([{"image": image, "messages": short}, {"image": image, "messages": late}])
    image_tokens = (batch["input_ids"] == small.processor.image_token_id).sum(-1)
    assert image_tokens.tolist() == [n_vis] and batch["image_features"].shape[0] == 1
    out = small.model(**batch)
    assert torch.isfinite(out.loss) and out.num_tokens > 0
    with pytest.raises(ValueError, match="every sample of a batch was skipped.*raise max_length"):
        collate([{"image": image, "messages": late}])


