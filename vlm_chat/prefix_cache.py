"""Shared-prefix generation: run an image's prompt prefix once, then decode all of its questions from that KV cache.

The chat template puts the image at the start of the first user turn, so every question about one image begins with
the same tokens: system turn, the user turn's opening and the visual tokens (for the demo model 73 of its ~85 prompt
tokens). :func:`generate_shared_prefix` runs that prefix once per distinct image, copies its KV cache to each of the
image's questions (``DynamicCache.batch_select_indices``) and lets ``generate`` prefill only the questions' own
tokens. The model sees exactly the token ids and positions of :meth:`VLMChat.generate_batch`'s left-padded batch
(only the padding moves, from before the prefix to between prefix and question, where the attention mask hides it
the same way), so greedy answers are the same.

Where sharing does not apply it falls back to ``chat.generate_batch``: text-only prompts, prompts whose image is not
in a prefix they all share (an ``<image>`` marker after differing text), sampling, beam search or several return
sequences, and objects that only offer ``generate_batch`` (scripted test models).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from typing import Any

import torch
from transformers import DynamicCache

logger = logging.getLogger(__name__)


def shared_prefix_length(sequences: Sequence[Sequence[int]], image_token_id: int) -> int | None:
    """How many leading tokens all ``sequences`` share, if that shared part holds every image token.

    Each sequence keeps at least its last token out of the prefix, so that generation has a token of its own to
    start from.

    Args:
        sequences: Token ids of the prompts (visual tokens expanded).
        image_token_id: The image placeholder id.

    Returns:
        The prefix length, or ``None`` when there are no sequences, a sequence holds no image token, or an image
        token lies past the shared prefix (the image is not at a start all prompts share).
    """
    if not sequences:
        return None
    first, limit = sequences[0], min(len(s) for s in sequences) - 1
    shared = 0
    while shared < limit and all(s[shared] == first[shared] for s in sequences):
        shared += 1
    for s in sequences:
        positions = [i for i, t in enumerate(s) if t == image_token_id]
        if not positions or positions[-1] >= shared:
            return None
    return shared


def _sharing_applies(gen: Any) -> bool:
    return not gen.do_sample and (gen.num_beams or 1) == 1 and (gen.num_return_sequences or 1) == 1


def _cache_keyword(module: torch.nn.Module) -> str:
    # transformers 5.x renamed ``past_key_values`` to ``cache`` (the old name stays a deprecated alias for a while).
    return "cache" if "cache" in inspect.signature(module.forward).parameters else "past_key_values"


def generate_shared_prefix(chat: Any, images: Sequence[Any], prompts: Sequence[str], **generate_kwargs: Any) -> list[str]:
    """Answer ``prompts`` about ``images`` as ``chat.generate_batch(images, prompts, **generate_kwargs)`` does,
    running each distinct image's prompt prefix once.

    Images are told apart by identity: pass the same object for the questions of one image (as
    :func:`vlm_chat.eval.common.generate_grouped` does).

    Args:
        chat: A :class:`~vlm_chat.VLMChat` (anything else is passed on to its ``generate_batch``).
        images: One image per prompt (PIL image, path, array).
        prompts: The questions.
        **generate_kwargs: Generation keywords, as for ``generate_batch`` (greedy by default).

    Returns:
        One answer per prompt, in order.
    """
    if len(images) != len(prompts):
        raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
    processor, model = getattr(chat, "processor", None), getattr(chat, "model", None)
    if processor is None or model is None or not prompts or any(image is None for image in images):
        return chat.generate_batch(list(images), list(prompts), **generate_kwargs)
    gen = chat.generation_config(generate_kwargs)
    if not _sharing_applies(gen):
        return chat.generate_batch(list(images), list(prompts), **generate_kwargs)
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt.strip():  # generate_batch raises the right error
            return chat.generate_batch(list(images), list(prompts), **generate_kwargs)
    encoded = [processor.encode_prompt(p, None, has_image=True, reserve=gen.max_new_tokens).input_ids for p in prompts]
    shared = shared_prefix_length(encoded, processor.image_token_id)
    if shared is None:
        return chat.generate_batch(list(images), list(prompts), **generate_kwargs)

    from vlm_chat.images import load_image

    distinct: dict[int, int] = {}  # id(image) -> row of the prefix batch
    unique = []
    for image in images:
        if id(image) not in distinct:
            distinct[id(image)] = len(unique)
            unique.append(image)
    rows = torch.tensor([distinct[id(image)] for image in images], device=chat.device)  # [B]
    with chat.lock, torch.inference_mode():
        pixel_values = processor.pixel_values([load_image(image) for image in unique]).to(chat.device)
        prefix_ids = torch.tensor([encoded[0][:shared]], device=chat.device).expand(len(unique), -1)  # [K, P]
        prefix_embeds = model.embed(prefix_ids, pixel_values)  # [K, P, d_lm]
        decoder = model.causal_lm.get_decoder()
        cache = DynamicCache(config=model.causal_lm.config)
        key = _cache_keyword(decoder)
        decoder(
            inputs_embeds=prefix_embeds,
            attention_mask=torch.ones(prefix_ids.shape, dtype=torch.long, device=chat.device),
            position_ids=torch.arange(shared, device=chat.device)[None],
            use_cache=True,
            **{key: cache},
        )
        cache.batch_select_indices(rows)  # [K, ...] -> [B, ...]: each question gets its image's prefix
        # The questions' own tokens, left-padded to a common width: the padding sits between prefix and question.
        suffixes = [ids[shared:] for ids in encoded]
        width = max(len(s) for s in suffixes)
        suffix_ids = torch.full((len(prompts), width), processor.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), shared + width), dtype=torch.long)
        mask[:, :shared] = 1
        for i, s in enumerate(suffixes):
            suffix_ids[i, width - len(s):] = torch.tensor(s)
            mask[i, shared + width - len(s):] = 1
        suffix_embeds = model.lm.get_input_embeddings()(suffix_ids.to(chat.device))  # [B, W, d_lm]
        # generate takes the whole sequence's embeddings and prefills only the part past the cache's length.
        embeds = torch.cat([prefix_embeds[rows], suffix_embeds], dim=1)  # [B, P + W, d_lm]
        out = model.lm.generate(
            inputs_embeds=embeds, attention_mask=mask.to(chat.device), generation_config=gen, **{key: cache}
        )
    return [t.strip() for t in processor.tokenizer.batch_decode(out, skip_special_tokens=True)]
