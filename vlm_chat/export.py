"""Export a vlm-chat model to a transformers-native ``LlavaForConditionalGeneration`` checkpoint, checked on write.

How the parts map (ours -> Llava):

- vision tower (a CLIP/SigLIP vision model) -> ``model.vision_tower``: the same class with the same weights;
  ``VisionConfig.feature_layer`` -> ``vision_feature_layer``; a CLS token we drop -> ``vision_feature_select_strategy
  = "default"`` (Llava drops the first token), no CLS or a kept one -> ``"full"``.
- MLP mapper of depth 2 without pooling (Linear, exact GELU, Linear) -> ``multi_modal_projector`` (linear_1,
  ``gelu``, linear_2). Perceiver, Q-Former, pooled or other-depth MLPs have no Llava counterpart and are refused.
- LLM + LoRA -> ``model.language_model`` + ``lm_head`` with the adapter merged (PEFT ``merge_and_unload`` on a copy);
  the image token's embedding row goes with it, ``image_token_id`` names it and ``image_seq_length`` is our
  ``num_image_tokens``.
- processor: ``LlavaProcessor`` over the tower's own image processor and our tokenizer, with ``patch_size`` and
  ``num_additional_image_tokens`` (1 for a CLS) so it expands ``<image>`` to exactly our visual token count; its chat
  template is the LLM's own behind a short prelude that flattens content parts as ``VLMProcessor.content_text`` does
  and adds the configured system prompt.
- generation config: greedy, EOS plus the template's end-of-turn token, the image token suppressed (as ``generate``).

After writing, :func:`verify_llava_export` reloads the directory with transformers alone and compares prompt tokens,
pixel values, logits and greedy text with the source model on probe inputs; any difference fails the export and
nothing is published (the directory is written through :func:`vlm_chat.atomic.atomic_directory`).
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw
from transformers import GenerationConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor
from transformers.initialization import no_init_weights

from vlm_chat.atomic import atomic_directory
from vlm_chat.card import model_card
from vlm_chat.images import ImageLike, load_image

logger = logging.getLogger(__name__)

#: ``VLMChat.export`` formats: ``merged`` (a vlm-chat checkpoint with LoRA merged) and ``llava`` (transformers-native).
FORMATS = ("merged", "llava")
#: Largest logit difference accepted, relative to the largest logit (max(1, max |logit|)), per compute dtype.
LOGIT_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


class ExportCheckError(ValueError):
    """The written export does not answer as the source model (the message names each difference)."""


def llava_unsupported(chat) -> str | None:
    """Why ``chat`` cannot be expressed as a transformers Llava (and what to do instead), or None if it can."""
    mapper, lm = chat.config.mapper, chat.config.lm
    fix = "export it with --format merged (a vlm-chat checkpoint) or train a Llava-style mapper (mapper kind mlp, " \
          "depth 2, pool 1, no position_embedding)"
    if mapper.kind != "mlp":
        return f"its {mapper.kind} mapper has no Llava counterpart (Llava's projector is a 2-layer MLP over every " \
               f"patch); {fix}"
    if mapper.depth != 2:
        return f"its MLP mapper has {mapper.depth} linear layer(s) but Llava's projector is a 2-layer MLP " \
               f"(linear, GELU, linear); {fix}"
    if mapper.pool != 1:
        return f"its MLP mapper average-pools the patch grid {mapper.pool}x{mapper.pool}, which Llava's 2-layer MLP " \
               f"projector cannot do (it maps every patch); {fix}"
    if mapper.position_embedding:
        return "its mapper adds a learned embedding per patch position before the MLP (mapper.position_embedding), " \
               f"which Llava's projector has no place for; {fix}"
    if lm.load_in_4bit:
        return "its LLM is loaded in 4-bit (QLoRA): merging the adapter needs the full-precision base weights. Set " \
               "lm.load_in_4bit to false in the checkpoint's config.json (the adapter applies to the same base) and " \
               "export again"
    return None


def _strategy(tower) -> str:
    return "default" if tower.has_cls and tower.drop_cls else "full"


def llava_config(chat) -> LlavaConfig:
    """The ``LlavaConfig`` holding ``chat``'s tower, projector and LLM configs (see the module docstring)."""
    tower, lm_cfg = chat.model.vision, chat.model.causal_lm.config
    return LlavaConfig(
        vision_config=tower.model.config.to_dict(),
        text_config=lm_cfg.to_dict(),
        image_token_id=chat.processor.image_token_id,
        image_seq_length=chat.config.num_image_tokens,
        vision_feature_layer=tower.feature_layer,
        vision_feature_select_strategy=_strategy(tower),
        projector_hidden_act="gelu",  # nn.GELU() in our MLP: the exact erf GELU in both
        multimodal_projector_bias=True,
        tie_word_embeddings=lm_cfg.tie_word_embeddings,
    )


def _plain_state(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A module's state under its plain names: PEFT's injected LoRA weights left out, ``base_layer`` unwrapped."""
    return {k.replace(".base_layer.", "."): v for k, v in module.state_dict().items() if ".lora_" not in k}


def _load(module: torch.nn.Module, state: dict[str, torch.Tensor], what: str) -> None:
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"Llava's {what} does not line up with ours: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")


def build_llava(chat, merge_lora: bool = True) -> LlavaForConditionalGeneration:
    """An HF Llava holding ``chat``'s current tower, mapper and LLM weights (eval mode, no gradients).

    Args:
        chat: A :class:`~vlm_chat.chat.VLMChat` with an ``mlp`` mapper of depth 2 and no pooling.
        merge_lora: Merge the LoRA adapter into the LLM's weights (a copy; ``chat`` keeps its adapter). False: the
            LLM's base weights only (``bench/llava_ref.py`` puts a PEFT adapter on top).

    Returns:
        The Llava model, on ``chat``'s device and in its dtype.

    Raises:
        ValueError: the model has no Llava form (the message says why and what to do), or a weight has no counterpart.
    """
    reason = llava_unsupported(chat)
    if reason:
        raise ValueError(f"cannot export as a transformers Llava: {reason}")
    tower, lm = chat.model.vision, chat.model.lm
    if merge_lora and hasattr(lm, "merge_and_unload"):
        causal_lm = copy.deepcopy(lm).merge_and_unload()  # a copy: merging in place would strip chat's adapter
    else:
        causal_lm = chat.model.causal_lm
    config = llava_config(chat)
    with no_init_weights():  # every weight is copied in below (strictly checked); a random init would only cost time
        llava = LlavaForConditionalGeneration(config)
    llava.tie_weights()  # what the skipped init_weights would have done
    proj = chat.model.mapper.proj  # Sequential(Linear, GELU, Linear)
    _load(llava.model.vision_tower, tower.model.state_dict(), "vision tower")
    _load(llava.model.multi_modal_projector, {f"linear_{i}.{p}": getattr(proj[j], p) for i, j in ((1, 0), (2, 2))
                                              for p in ("weight", "bias")}, "projector")
    _load(llava.model.language_model, _plain_state(causal_lm.get_decoder()), "language model")
    head, embed = llava.get_output_embeddings().weight, llava.get_input_embeddings().weight
    if config.tie_word_embeddings:
        if head.data_ptr() != embed.data_ptr():
            raise ValueError("Llava's LM head is not tied to its embeddings although the LLM's config ties them")
    else:
        _load(llava.lm_head, _plain_state(causal_lm.get_output_embeddings()), "LM head")
    dtype = next(chat.model.causal_lm.parameters()).dtype
    llava.to(device=chat.device, dtype=dtype)
    llava.requires_grad_(False)
    return llava.eval()


def processor_chat_template(chat) -> str:
    """The LLM's chat template behind a prelude that makes it render what ``VLMProcessor.render`` renders.

    The prelude turns transformers' content parts (``{"type": "image"}``, ``{"type": "text", "text"}``) into one string,
    an image part becoming the image token and a part that follows an image starting on a new line (LLaVA's
    ``<image>\\nquestion``), and puts the configured system prompt before a conversation that has no system turn.
    Written as Jinja because the template must work without vlm-chat (pipelines, vLLM, TGI render it themselves).
    """
    template = chat.processor.tokenizer.chat_template
    if not isinstance(template, str):
        raise ValueError("the tokenizer holds several named chat templates; export needs one default template")
    image = json.dumps(chat.config.image_token)  # a JSON string is a valid Jinja string literal
    system = chat.config.system_prompt
    prelude = "{% set ns = namespace(messages=[], text='', after_image=false) %}"
    if system is not None:
        prelude += ("{% if not messages or messages[0]['role'] != 'system' %}{% set ns.messages = [{'role': 'system', "
                    f"'content': {json.dumps(system)}}}] %}}{{% endif %}}")
    prelude += (
        "{% for message in messages %}"
        "{% if message['content'] is string or message['content'] is none %}"
        "{% set ns.text = message['content'] or '' %}"
        "{% else %}{% set ns.text = '' %}{% set ns.after_image = false %}"
        "{% for part in message['content'] %}"
        "{% set piece = " + image + " if part['type'] == 'image' else "
        "(part['text'] if part['type'] == 'text' else '') %}"
        "{% set ns.text = ns.text + ('\\n' if ns.after_image else '') + piece %}"
        "{% set ns.after_image = part['type'] == 'image' %}"
        "{% endfor %}{% endif %}"
        "{% set ns.messages = ns.messages + [{'role': message['role'], 'content': ns.text}] %}"
        "{% endfor %}{% set messages = ns.messages %}"
    )
    return prelude + template


def llava_processor(chat) -> LlavaProcessor:
    """A ``LlavaProcessor`` that tokenizes, templates and expands images exactly as ``chat.processor`` does."""
    tower = chat.model.vision
    tokenizer = copy.deepcopy(chat.processor.tokenizer)  # the live one keeps its template and padding side
    template = processor_chat_template(chat)
    tokenizer.chat_template = template
    tokenizer.padding_side = "left"  # batched generation with a decoder-only LM (the pipeline batches this way)
    return LlavaProcessor(
        image_processor=chat.processor.image_processor,
        tokenizer=tokenizer,
        patch_size=tower.model.config.patch_size,
        vision_feature_select_strategy=_strategy(tower),
        chat_template=template,
        image_token=chat.config.image_token,
        num_additional_image_tokens=1 if tower.has_cls else 0,
    )


def default_probes() -> list[tuple[Image.Image | None, str]]:
    """Probe inputs of the export check: three drawn images with four questions and one text-only turn."""
    def draw(background, colour, shape):
        img = Image.new("RGB", (96, 96), background)
        box = (24, 24, 72, 72)
        canvas = ImageDraw.Draw(img)
        if shape == "circle":
            canvas.ellipse(box, fill=colour)
        elif shape == "triangle":
            canvas.polygon([(48, 20), (76, 76), (20, 76)], fill=colour)
        else:
            canvas.rectangle(box, fill=colour)
        return img

    red, blue, green = draw((200, 200, 200), (220, 40, 40), "circle"), draw((255, 255, 255), (30, 60, 220), "square"), \
        draw((40, 40, 40), (40, 180, 60), "triangle")
    return [(red, "What color is the shape?"), (blue, "What shape is in the image?"),
            (green, "Describe the image in one short sentence."), (red, "Is there a blue square?"),
            (None, "Say hello.")]


def _first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


@torch.inference_mode()
def verify_llava_export(chat, directory: str | os.PathLike, probes: list[tuple[ImageLike | None, str]] | None = None,
                        max_new_tokens: int = 24) -> dict[str, Any]:
    """Reload an export with transformers alone and check it answers as ``chat`` does.

    Per probe: the exported processor's prompt tokens and pixel values equal vlm-chat's, the logits at every prompt
    position agree within :data:`LOGIT_TOLERANCE`, and greedy decoding gives the same tokens.

    Args:
        chat: The source model.
        directory: The written export.
        probes: ``(image or None, prompt)`` pairs; default :func:`default_probes`.
        max_new_tokens: Tokens of each greedy comparison.

    Returns:
        ``{"probes", "max_logit_diff", "logit_tolerance", "greedy_equal", "texts"}``.

    Raises:
        ExportCheckError: any difference (every failing probe is named).
    """
    from transformers import AutoModelForImageTextToText, AutoProcessor

    dtype = next(chat.model.causal_lm.parameters()).dtype
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=dtype).to(chat.device).eval()
    processor = AutoProcessor.from_pretrained(directory)
    probes = default_probes() if probes is None else probes
    problems, texts, max_diff, equal, tolerance = [], [], 0.0, 0, 0.0
    for i, (image, prompt) in enumerate(probes):
        name = f"probe {i} ({'image, ' if image is not None else 'text only, '}{prompt!r})"
        pil = load_image(image) if image is not None else None
        ours = chat.processor.encode_prompt(prompt, has_image=pil is not None, reserve=max_new_tokens).input_ids
        content = ([{"type": "image", "image": pil}] if pil is not None else []) + [{"type": "text", "text": prompt}]
        inputs = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                               tokenize=True, return_dict=True, return_tensors="pt").to(chat.device)
        theirs = inputs["input_ids"][0].tolist()
        if theirs != ours:
            k = _first_difference(ours, theirs)
            problems.append(f"{name}: the exported processor's prompt differs at token {k} (vlm-chat "
                            f"{ours[k:k + 3]}, export {theirs[k:k + 3]}; {len(ours)} vs {len(theirs)} tokens)")
            continue
        pixels = None
        if pil is not None:
            pixels = chat.processor.pixel_values([pil]).to(chat.device)
            if pixels.shape != inputs["pixel_values"].shape or not torch.allclose(pixels, inputs["pixel_values"],
                                                                                    atol=1e-5):
                problems.append(f"{name}: the exported image processor gives other pixel values")
                continue
        ids = torch.tensor([ours], device=chat.device)
        ours_logits = chat.model.causal_lm(inputs_embeds=chat.model.embed(ids, pixels)).logits.float()  # [1, T, V]
        theirs_logits = model(**inputs).logits.float()  # [1, T, V]
        diff = float((ours_logits - theirs_logits).abs().max())
        tol = LOGIT_TOLERANCE.get(dtype, 3e-2) * max(1.0, float(ours_logits.abs().max()))
        max_diff, tolerance = max(max_diff, diff), max(tolerance, tol)
        if not diff <= tol:
            problems.append(f"{name}: logits differ by up to {diff:.3g} (tolerance {tol:.3g})")
        ours_text = chat.generate(pil, prompt, max_new_tokens=max_new_tokens)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens)  # generation_config.json: greedy, eos, suppress
        theirs_text = processor.decode(out[0, len(theirs):], skip_special_tokens=True).strip()
        texts.append(theirs_text)
        if theirs_text == ours_text:
            equal += 1
        else:
            problems.append(f"{name}: greedy text differs (vlm-chat {ours_text!r}, export {theirs_text!r})")
    if problems:
        raise ExportCheckError("the exported Llava does not answer as the source model: " + "; ".join(problems))
    return {"probes": len(probes), "max_logit_diff": max_diff, "logit_tolerance": tolerance, "greedy_equal": equal,
            "max_new_tokens": max_new_tokens, "texts": texts}


def export_llava(chat, path: str | os.PathLike, card: str | None = None,
                 probes: list[tuple[ImageLike | None, str]] | None = None, max_new_tokens: int = 24) -> dict[str, Any]:
    """Write ``chat`` as a transformers Llava checkpoint at ``path``, published only once it passes the check.

    Args:
        chat: The source model.
        path: Output directory (replaced atomically if it exists).
        card: ``README.md`` text; default: :func:`vlm_chat.card.model_card` with the check's result.
        probes: Probe inputs of :func:`verify_llava_export`.
        max_new_tokens: Tokens of each greedy comparison.

    Returns:
        The check's report (:func:`verify_llava_export`) plus ``seconds``.

    Raises:
        ValueError: the model has no Llava form (before anything is written).
        ExportCheckError: the written model does not answer as ``chat`` (nothing is published).
    """
    reason = llava_unsupported(chat)
    if reason:
        raise ValueError(f"cannot export as a transformers Llava: {reason}")
    start = time.perf_counter()
    with atomic_directory(path) as tmp:
        llava = build_llava(chat)
        llava.generation_config = GenerationConfig(**{**chat.generation_config({}).to_diff_dict(),
                                                      "bos_token_id": chat.processor.tokenizer.bos_token_id})
        llava.save_pretrained(tmp)
        del llava
        mode = (tmp / "config.json").stat().st_mode & 0o777  # what this process's umask gives a new file
        for weights in tmp.glob("*.safetensors"):  # written owner-only (a private temp file renamed into place)
            weights.chmod(mode)
        llava_processor(chat).save_pretrained(tmp)
        report = verify_llava_export(chat, tmp, probes, max_new_tokens)
        body = (f"## Export check\n\nReloaded with transformers alone and compared with the source vlm-chat model on "
                f"{report['probes']} probe prompts: greedy text equal on {report['greedy_equal']}/{report['probes']} "
                f"({max_new_tokens} new tokens), largest logit difference {report['max_logit_diff']:.3g}.\n")
        (tmp / "README.md").write_text(card or model_card(chat.config, "llava", body=body))
    report["seconds"] = time.perf_counter() - start
    logger.info("exported Llava to %s: %d/%d probes equal, max logit diff %.3g (%.1f s)", path,
                report["greedy_equal"], report["probes"], report["max_logit_diff"], report["seconds"])
    return report


def hub_offline() -> bool:
    """True when ``HF_HUB_OFFLINE`` is set (now, or when ``huggingface_hub`` was imported)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE", "").strip().upper()
    return value in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)


def check_can_upload(repo_id: str) -> None:
    """Refuse an upload that cannot happen (offline, bad repo id) before anything is written.

    Raises:
        ConnectionError: the Hub is switched off (``HF_HUB_OFFLINE``).
        ValueError: ``repo_id`` is not a valid ``owner/name``.
    """
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ValueError(f"push_to_hub: {repo_id!r} is not a valid Hub repo id ({e})") from e
    if hub_offline():
        raise ConnectionError("push_to_hub: the Hugging Face Hub is off here (HF_HUB_OFFLINE is set), so nothing was "
                              "written or uploaded; unset HF_HUB_OFFLINE and log in (`hf auth login`) to upload, or "
                              "write the directory with save_pretrained/export and upload it later")


def upload_folder(folder: str | os.PathLike, repo_id: str, *, private: bool | None = None, token: str | None = None,
                  commit_message: str | None = None):
    """Create the model repo if needed and upload a written checkpoint or export directory to it.

    Returns:
        huggingface_hub's ``CommitInfo`` of the upload.
    """
    from huggingface_hub import HfApi

    check_can_upload(repo_id)
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                             commit_message=commit_message or f"Upload {Path(folder).name} with vlm-chat")


def push_to_hub(chat, repo_id: str, format: str = "checkpoint", *, private: bool | None = None,
                token: str | None = None, commit_message: str | None = None, card: str | None = None):
    """:meth:`VLMChat.push_to_hub`: write ``chat`` in ``format`` to a temporary folder, then upload it."""
    import tempfile

    if format != "checkpoint" and format not in FORMATS:
        raise ValueError(f"unknown push format {format!r}; valid: checkpoint, {', '.join(FORMATS)}")
    check_can_upload(repo_id)
    with tempfile.TemporaryDirectory(prefix="vlm-chat-push-") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        if format == "checkpoint":
            chat.save_pretrained(folder, card=card)
        else:
            chat.export(folder, format=format, card=card)
        return upload_folder(folder, repo_id, private=private, token=token, commit_message=commit_message)
