"""The assembled VLM: shapes, save/load, generation, training steps, QLoRA, errors."""

import json

import pytest
import torch

from vlm_chat import VLMChat
from vlm_chat.config import MapperConfig
from vlm_chat.mappers import build_mapper

GEN = {"max_new_tokens": 6, "min_new_tokens": 6}  # fixed length: compare real tokens, not empty strings


@pytest.fixture(scope="module")
def chat(tiny_clip_dir, tiny_llama_dir):
    return VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), mapper="mlp")


def _training_batch(chat, images, conversations):
    proc = chat.processor
    enc = [proc.encode_conversation(c, num_images=1) for c in conversations]
    batch = proc.pad(enc, "right")
    batch["pixel_values"] = proc.pixel_values(images)
    return batch


def _conv(q, a):
    return [{"role": "user", "content": f"<image>\n{q}"}, {"role": "assistant", "content": a}]


@pytest.mark.parametrize("mapper", ["mlp", "perceiver", "qformer"])
@pytest.mark.parametrize("lm", ["llama", "qwen2"])
@pytest.mark.parametrize("tower", ["clip", "siglip"])
def test_components_generate_save_load_roundtrip(request, tmp_path, red_circle, tower, lm, mapper):
    vision_dir = request.getfixturevalue(f"tiny_{tower}_dir")
    lm_dir = request.getfixturevalue(f"tiny_{lm}_dir")
    chat = VLMChat.from_components(str(vision_dir), str(lm_dir), mapper=mapper, seed=1)
    # Visual tokens: CLIP 16 patches (CLS dropped), SigLIP 16 patches; perceiver/qformer 16 queries by default.
    assert chat.config.num_image_tokens == 16
    pixel_values = chat.processor.pixel_values([red_circle, red_circle])
    feats = chat.model.vision(pixel_values)
    assert feats.shape == (2, 16, 32)
    assert chat.model.encode_images(pixel_values).shape == (2, 16, 32)
    text = chat.generate(red_circle, "What color is the shape?", **GEN)
    assert len(chat.processor.tokenizer(text, add_special_tokens=False)["input_ids"]) >= 3
    batch = chat._inputs([red_circle], ["What color is the shape?"], [None], reserve=8)
    with torch.no_grad():
        logits = chat.model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits

    chat.save_pretrained(tmp_path / "ckpt")
    again = VLMChat.from_pretrained(tmp_path / "ckpt")
    assert again.generate(red_circle, "What color is the shape?", **GEN) == text
    with torch.no_grad():
        logits2 = again.model(batch["input_ids"], batch["attention_mask"], pixel_values=batch["pixel_values"]).logits
    torch.testing.assert_close(logits2, logits)


def test_checkpoint_layout(chat, tmp_path):
    chat.save_pretrained(tmp_path / "ckpt")
    files = {p.relative_to(tmp_path / "ckpt").as_posix() for p in (tmp_path / "ckpt").rglob("*") if p.is_file()}
    for required in ["config.json", "mapper.safetensors", "adapter/adapter_config.json",
                     "adapter/adapter_model.safetensors", "tokenizer_config.json", "preprocessor_config.json",
                     "README.md", "vision/config.json", "vision/model.safetensors"]:
        assert required in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)  # safetensors only
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    assert cfg["vision"]["name_or_path"] == "vision" and cfg["num_image_tokens"] == 16
    assert "<image>" in (tmp_path / "ckpt" / "tokenizer.json").read_text()


def test_forward_loss_equals_transformers_loss_over_all_logits(chat, red_circle, blue_square):
    """Computing the LM head only at supervised positions gives the same loss as the usual full-logits loss."""
    batch = _training_batch(chat, [red_circle, blue_square],
                            [_conv("What color?", "Red."), _conv("What shape is in the picture?", "A blue square.")])
    with torch.no_grad():
        ours = chat.model(**batch)
        embeds = chat.model.embed(batch["input_ids"], batch["pixel_values"])
        ref = chat.model.lm(inputs_embeds=embeds, attention_mask=batch["attention_mask"], labels=batch["labels"])
    torch.testing.assert_close(ours.loss, ref.loss)
    assert ours.num_tokens == (batch["labels"][:, 1:] != -100).sum()
    torch.testing.assert_close(ours.logps.sum(), -ours.loss_sum)


@pytest.mark.parametrize("lm", ["llama", "qwen2"])
def test_independent_turns_train_exactly_what_single_questions_would(request, lm, red_circle, blue_square):
    """A packed conversation with independent turns: each pair's loss is that of the pair asked alone, and the summed
    log-likelihood is the sum over the single-question samples (so no pair sees another's answer)."""
    chat = VLMChat.from_components(str(request.getfixturevalue("tiny_clip_dir")),
                                   str(request.getfixturevalue(f"tiny_{lm}_dir")), mapper="mlp", seed=3)
    proc = chat.processor
    qa = [("What color?", "Red."), ("Is there a triangle in the picture?", "No."), ("What shape?", "A circle.")]
    conversation = _conv(*qa[0]) + [m for q, a in qa[1:] for m in ({"role": "user", "content": q},
                                                                  {"role": "assistant", "content": a})]
    packed = proc.encode_independent_turns(conversation, num_images=1)
    assert packed.input_ids.count(proc.image_token_id) == chat.config.num_image_tokens  # the image once
    one = proc.encode_independent_turns(_conv("Hi", "Yo."), num_images=1)  # shorter: padding in the batch below
    plain = proc.encode_conversation(_conv("Hi", "Yo."), num_images=1)
    assert (one.input_ids, one.labels) == (plain.input_ids, plain.labels)  # one pair: the plain encoding
    batch = proc.pad([packed, one], "right")
    assert batch["attention_mask"].shape[:2] == (2, 1) and batch["position_ids"].shape == batch["input_ids"].shape
    batch["pixel_values"] = proc.pixel_values([red_circle, blue_square])
    singles = _training_batch(chat, [red_circle] * 3 + [blue_square], [_conv(q, a) for q, a in qa] + [_conv("Hi", "Yo.")])
    with torch.no_grad():
        ours, ref = chat.model(**batch), chat.model(**singles)
    torch.testing.assert_close(ours.logps, torch.stack([ref.logps[:3].sum(), ref.logps[3]]), rtol=1e-4, atol=1e-4)
    assert ours.num_tokens == ref.num_tokens
    # Without the isolation the later answers would see the earlier ones: a different likelihood.
    with torch.no_grad():
        joint = chat.model(**_training_batch(chat, [red_circle], [conversation]))
    assert not torch.allclose(joint.logps[0], ours.logps[0], atol=1e-3)


def test_independent_turns_refuse_what_they_cannot_split(chat, red_circle):
    proc = chat.processor
    with pytest.raises(ValueError, match="alternating user/assistant"):
        proc.encode_independent_turns([{"role": "user", "content": "<image>\nA?"}], num_images=1)
    with pytest.raises(ValueError, match="first user turn and nowhere else"):
        proc.encode_independent_turns(_conv("A?", "a") + _conv("B?", "b"), num_images=1)
    with pytest.raises(ValueError, match="4D attention_mask needs position_ids"):
        batch = proc.pad([proc.encode_independent_turns(_conv("A?", "a"), num_images=1)], "right")
        chat.model(batch["input_ids"], batch["attention_mask"], labels=batch["labels"],
                   pixel_values=proc.pixel_values([red_circle]))


def test_image_count_mismatch_names_both_counts(chat, red_circle):
    batch = _training_batch(chat, [red_circle], [_conv("What color?", "Red.")])
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == chat.processor.image_token_id).nonzero()[0]] = chat.processor.tokenizer.pad_token_id
    with pytest.raises(ValueError, match="15 image tokens.*1 x 16 = 16 visual tokens"):
        chat.model(ids, batch["attention_mask"], pixel_values=batch["pixel_values"])
    with pytest.raises(ValueError, match="no image was given"):
        chat.model(batch["input_ids"], batch["attention_mask"])


def test_three_steps_train_mapper_and_lora_only(tiny_siglip_dir, tiny_qwen2_dir, red_circle, blue_square):
    chat = VLMChat.from_components(str(tiny_siglip_dir), str(tiny_qwen2_dir), mapper="perceiver")
    model = chat.model
    model.configure_trainable(mapper=True, lora=True)
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("mapper.") or "lora_" in n for n in trainable)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _training_batch(chat, [red_circle, blue_square], [_conv("Color?", "Red."), _conv("Shape?", "Square.")])
    losses = []
    for _ in range(3):
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]
    for name, p in model.named_parameters():
        changed = not torch.equal(p, before[name])
        if name.startswith("mapper."):
            assert changed, name
        elif "lora_" in name:
            # LoRA B starts at zero and A gets no gradient until B moves: after 3 steps both have moved.
            assert changed, name
        else:
            assert not changed, f"frozen parameter {name} changed"


def test_configure_trainable_mapper_only(chat):
    counts = chat.model.configure_trainable(mapper=True, lora=False)
    assert counts["lora (frozen)"] > 0
    assert not any(p.requires_grad for n, p in chat.model.named_parameters() if not n.startswith("mapper."))
    chat.model.configure_trainable(mapper=True, lora=True)


def test_batched_generation_equals_one_at_a_time(chat, red_circle, blue_square):
    prompts = ["What color is it?", "Describe the shape in the middle of the picture, please.", "Hi"]
    images = [red_circle, blue_square, blue_square]
    batched = chat.generate_batch(images, prompts, **GEN)
    single = [chat.generate(img, p, **GEN) for img, p in zip(images, prompts)]
    assert batched == single
    assert len(set(batched)) > 1


def test_sampling_beams_history_and_text_only(chat, red_circle):
    torch.manual_seed(0)
    sampled = chat.generate(red_circle, "Say something.", do_sample=True, temperature=1.0, top_p=0.9, **GEN)
    torch.manual_seed(0)
    assert chat.generate(red_circle, "Say something.", do_sample=True, temperature=1.0, top_p=0.9, **GEN) == sampled
    assert chat.generate(red_circle, "Say something.", num_beams=2, **GEN)
    history = [{"role": "user", "content": "What color?"}, {"role": "assistant", "content": "Red."}]
    with_history = chat.generate(red_circle, "And the shape?", history=history, **GEN)
    assert with_history and with_history != chat.generate(red_circle, "And the shape?", **GEN)
    assert chat.generate(None, "Hello, who are you?", **GEN)


def test_stream_yields_the_generated_text(chat, red_circle):
    pieces = list(chat.stream(red_circle, "What color?", **GEN))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == chat.generate(red_circle, "What color?", **GEN)


def test_caption_and_prompt_errors(chat, red_circle):
    assert chat.caption(red_circle, **GEN)
    assert chat.caption(red_circle, detailed=True, **GEN)
    with pytest.raises(ValueError, match="prompt is empty"):
        chat.generate(red_circle, "   ")
    with pytest.raises(TypeError, match="prompt must be a string"):
        chat.generate(red_circle, 42)


def test_export_merges_lora_and_reloads(chat, tmp_path, red_circle):
    # Give LoRA a non-zero effect first, so merging has something to merge.
    with torch.no_grad():
        for n, p in chat.model.lm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    expected = chat.generate(red_circle, "What color?", **GEN)
    chat.export(tmp_path / "merged")
    assert not (tmp_path / "merged" / "adapter").exists() and (tmp_path / "merged" / "lm" / "config.json").exists()
    merged = VLMChat.from_pretrained(tmp_path / "merged")
    assert merged.config.lm.use_lora is False
    assert merged.generate(red_circle, "What color?", **GEN) == expected
    assert chat.generate(red_circle, "What color?", **GEN) == expected  # export left the adapter in place
    with torch.no_grad():
        for n, p in chat.model.lm.named_parameters():
            if "lora_B" in n:
                p.zero_()


def test_broken_checkpoints_are_refused(chat, tmp_path):
    chat.save_pretrained(tmp_path / "ckpt")
    with pytest.raises(FileNotFoundError, match="not found"):
        VLMChat.from_pretrained(tmp_path / "nope")
    (tmp_path / "ckpt" / "mapper.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="missing mapper.safetensors"):
        VLMChat.from_pretrained(tmp_path / "ckpt")
    chat.save_pretrained(tmp_path / "ckpt")
    cfg = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    cfg["format_version"] = 99
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="format_version 99"):
        VLMChat.from_pretrained(tmp_path / "ckpt")
    cfg["format_version"] = 1
    cfg["mapper"]["knd"] = "mlp"
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="unknown key.*mapper.knd"):
        VLMChat.from_pretrained(tmp_path / "ckpt")


def test_save_is_atomic_over_an_existing_checkpoint(chat, tmp_path, monkeypatch, red_circle):
    chat.save_pretrained(tmp_path / "ckpt")
    expected = chat.generate(red_circle, "What color?", **GEN)

    def crash(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("vlm_chat.chat.VLMConfig.save", crash)
    with pytest.raises(RuntimeError):
        chat.save_pretrained(tmp_path / "ckpt")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp directory left behind
    assert VLMChat.from_pretrained(tmp_path / "ckpt").generate(red_circle, "What color?", **GEN) == expected


@pytest.mark.parametrize("kind,depth,pool,n_out", [("mlp", 1, 1, 16), ("mlp", 2, 2, 4), ("perceiver", 0, 0, 8),
                                                    ("qformer", 0, 0, 8)])
def test_mapper_shapes(kind, depth, pool, n_out):
    cfg = MapperConfig(kind=kind, depth=depth or 2, pool=pool or 1, num_queries=8, num_heads=4)
    mapper = build_mapper(cfg, d_vis=24, d_lm=40, grid=4)
    assert mapper(torch.randn(3, 16, 24)).shape == (3, n_out, 40)
    assert mapper.num_tokens(16) == n_out
    if kind == "mlp" and depth == 1:
        assert [type(m).__name__ for m in mapper.proj] == ["Linear"]


@pytest.mark.parametrize("kind", ["mlp", "perceiver", "qformer"])
def test_position_embedding_tells_the_mapper_where_a_token_is(kind):
    """Without it every mapper is blind to which patch a feature came from (an MLP maps each token alone, the
    attention mappers are permutation-invariant over patches); with it, the same feature at another place maps to
    something else, and it starts at zero, so a mapper begins as it would without it."""
    torch.manual_seed(0)
    plain = build_mapper(MapperConfig(kind=kind, num_queries=8, num_heads=4), d_vis=24, d_lm=40, grid=4)
    torch.manual_seed(0)
    placed = build_mapper(MapperConfig(kind=kind, num_queries=8, num_heads=4, position_embedding=True), d_vis=24,
                          d_lm=40, grid=4, num_inputs=16)
    x = torch.randn(2, 16, 24)
    swapped = x[:, torch.randperm(16, generator=torch.Generator().manual_seed(1))]
    torch.testing.assert_close(placed(x), plain(x))  # zero-initialised
    assert placed.num_tokens(16) == plain.num_tokens(16)
    with torch.no_grad():
        placed.positions.normal_()
    if kind == "mlp":  # per token: a moved feature moves its visual token and nothing else
        perm = torch.randperm(16, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(plain(swapped), plain(x)[:, perm])
        assert not torch.allclose(placed(swapped), placed(x)[:, perm])
    else:
        torch.testing.assert_close(plain(swapped), plain(x), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(placed(swapped), placed(x), atol=1e-3)
    assert sorted(placed.state_dict())[-1] == "positions"
    with pytest.raises(ValueError, match="position_embedding has 16 positions, got 9 tokens"):
        placed(torch.randn(1, 9, 24))
    with pytest.raises(ValueError, match="needs the number of tokens"):
        build_mapper(MapperConfig(position_embedding=True), d_vis=24, d_lm=40, grid=4)


def test_position_embedding_saves_and_reloads(tiny_clip_dir, tiny_llama_dir, tmp_path, red_circle):
    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), mapper_config={"position_embedding": True})
    with torch.no_grad():
        chat.model.mapper.positions.normal_()  # as if trained
    chat.save_pretrained(tmp_path / "ckpt")
    back = VLMChat.from_pretrained(tmp_path / "ckpt")
    assert back.config.mapper.position_embedding is True
    torch.testing.assert_close(back.model.mapper.positions, chat.model.mapper.positions)
    assert back.generate(red_circle, "What color?", **GEN) == chat.generate(red_circle, "What color?", **GEN)


def test_unknown_mapper_lists_valid_ones():
    with pytest.raises(ValueError, match="unknown mapper 'resampler'; valid mappers: mlp, perceiver, qformer"):
        build_mapper(MapperConfig(kind="resampler"), 8, 8)


def test_feature_layer_and_cls(tiny_clip_dir, tiny_llama_dir):
    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), feature_layer=-1)
    pixel_values = torch.randn(1, 3, 32, 32)
    out = chat.model.vision.model(pixel_values=pixel_values, output_hidden_states=True)
    torch.testing.assert_close(chat.model.vision(pixel_values), out.hidden_states[-1][:, 1:])
    with pytest.raises(ValueError, match="feature_layer=7 is out of range"):
        VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), feature_layer=7)


def test_qlora_builds_and_steps_on_cpu(tmp_path, tiny_clip_dir, tokenizer_factory, red_circle):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, LlamaConfig

    # bitsandbytes' CPU kernels quantize in blocks of 64 input features: hidden 64 is the smallest that decodes.
    tok = tokenizer_factory("smollm2")
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=len(tok), initializer_range=0.3)
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    chat = VLMChat.from_components(str(tiny_clip_dir), str(tmp_path / "lm"), lm_config={"load_in_4bit": True},
                                   device="cpu")
    assert any("4bit" in type(m).__name__ for m in chat.model.lm.modules())
    chat.model.configure_trainable()
    chat.model.train()
    lora = {n: p.detach().clone() for n, p in chat.model.named_parameters() if "lora_B" in n}
    opt = torch.optim.AdamW([p for p in chat.model.parameters() if p.requires_grad], lr=1e-2)
    batch = _training_batch(chat, [red_circle], [_conv("Color?", "Red.")])
    for _ in range(2):
        chat.model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    assert any(not torch.equal(p, lora[n]) for n, p in chat.model.named_parameters() if "lora_B" in n)
    chat.model.eval()
    assert chat.generate(red_circle, "Color?", **GEN)


def test_same_seed_same_untrained_model(tiny_clip_dir, tiny_llama_dir):
    a = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), seed=3)
    b = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), seed=3)
    c = VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), seed=4)
    lora = [n for n, _ in a.model.named_parameters() if "lora_A" in n][0]
    pa, pb, pc = (dict(m.model.named_parameters()) for m in (a, b, c))
    assert torch.equal(pa[lora], pb[lora]) and not torch.equal(pa[lora], pc[lora])
    assert torch.equal(pa["mapper.proj.0.weight"], pb["mapper.proj.0.weight"])
