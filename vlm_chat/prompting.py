"""Prompts and labels from the LLM's own chat template.

Messages are transformers-style (``{"role", "content"}``, content a string or a list of ``{"type": "image"}`` /
``{"type": "text", "text"}`` parts). The image goes where the user wrote ``<image>`` or, if they did not, at the start
of the first user turn (LLaVA's convention). The single image token is expanded to ``num_image_tokens`` copies after
tokenization, so the text's token offsets stay intact.

Assistant-token labels come from the template itself: the characters that the template adds when an assistant turn is
appended (render messages[:i] with the generation prompt vs render messages[:i+1]) are that turn. No model-specific
marker strings are searched for, which is what broke LLaVA's masking on other LLMs ("tokenization mismatch").
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from vlm_chat.images import bound_aspect

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
Message = dict[str, Any]


@dataclass
class Encoded:
    """One tokenized sample. ``labels`` is None for inference prompts.

    ``segments`` and ``position_ids`` are set only by :meth:`VLMProcessor.encode_independent_turns`: segment 0 is the
    shared prefix, segment i the i-th question-answer pair, which sees only the prefix and itself.
    """

    input_ids: list[int]
    labels: list[int] | None = None
    num_images: int = 0
    segments: list[int] | None = None
    position_ids: list[int] | None = None


class VLMProcessor:
    """Builds prompts, expands image tokens, derives assistant labels and pads batches.

    Args:
        tokenizer: The LLM's tokenizer, holding ``image_token`` as a special token.
        image_processor: The vision tower's own image processor.
        image_token: The placeholder string (``<image>``).
        num_image_tokens: Visual tokens each image becomes.
        max_length: Longest sequence, visual tokens included.
        system_prompt: System turn put before every conversation that has none; None leaves it to the template
            (SmolLM2's inserts a 20-token default, Llama-3's none).
    """

    def __init__(self, tokenizer, image_processor, image_token: str, num_image_tokens: int, max_length: int,
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.image_processor = image_processor
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.stop_token_ids = self._stop_token_ids()

    # ----------------------------------------------------------------------------------------------- messages
    def content_text(self, content: str | list[dict[str, Any]]) -> str:
        """Flatten message content to the string the template sees; image parts become the image token."""
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise TypeError(f"message content must be a string or a list of parts, got {type(content).__name__}")
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "image":
                pieces.append(self.image_token)
            elif kind == "text":
                pieces.append(part.get("text", ""))
            else:
                raise ValueError(f"message part must be {{'type': 'image'}} or {{'type': 'text', ...}}, got {part!r}")
        # LLaVA's layout: an image part followed by text is "<image>\ntext".
        return "".join(p if i == 0 or pieces[i - 1] != self.image_token else "\n" + p for i, p in enumerate(pieces))

    def build_messages(self, prompt: str, history: list[Message] | None = None, has_image: bool = True) -> list[Message]:
        """Conversation for one new user turn: earlier turns, then ``prompt``; the image in the first user turn.

        A literal ``<image>`` anywhere in the user turns marks where the image goes instead.
        """
        messages = [self._checked_turn(i, m) for i, m in enumerate(history or [])]
        messages.append({"role": "user", "content": prompt})
        marked = sum(m["content"].count(self.image_token) for m in messages)
        if has_image and marked == 0:
            first_user = next(i for i, m in enumerate(messages) if m["role"] == "user")
            messages[first_user] = {"role": "user", "content": f"{self.image_token}\n{messages[first_user]['content']}"}
        return messages

    def _checked_turn(self, index: int, turn: Any) -> Message:
        if not isinstance(turn, dict):
            raise TypeError(f"history[{index}] must be a dict with 'role' and 'content', got {type(turn).__name__}")
        if turn.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"history[{index}] has role {turn.get('role')!r}; valid roles: system, user, assistant")
        if "content" not in turn:
            raise ValueError(f"history[{index}] has no 'content'")
        try:
            content = self.content_text(turn["content"])
        except (TypeError, ValueError) as e:
            raise type(e)(f"history[{index}]: {e}") from e
        return {"role": turn["role"], "content": content}

    def render(self, messages: list[Message], add_generation_prompt: bool) -> str:
        if self.system_prompt is not None and messages and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    # ----------------------------------------------------------------------------------------------- encoding
    def _check_images(self, text: str, num_images: int) -> None:
        found = text.count(self.image_token)
        if found != num_images:
            raise ValueError(
                f"the conversation has {found} '{self.image_token}' marker(s) but {num_images} image(s) were given; "
                f"use exactly one '{self.image_token}' per image (or none, to put the image at the start)"
            )

    def _tokenize(self, text: str) -> Any:
        # The rendered template already holds BOS/EOS where the model wants them (as apply_chat_template(tokenize=True)).
        return self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)

    def _expand(self, ids: list[int], labels: list[int] | None) -> tuple[list[int], list[int] | None]:
        """Replace each image token by ``num_image_tokens`` copies (labels there: ignored)."""
        out_ids, out_labels = [], ([] if labels is not None else None)
        for i, tok in enumerate(ids):
            if tok == self.image_token_id:
                out_ids += [tok] * self.num_image_tokens
                if out_labels is not None:
                    out_labels += [IGNORE_INDEX] * self.num_image_tokens
            else:
                out_ids.append(tok)
                if out_labels is not None:
                    out_labels.append(labels[i])
        return out_ids, out_labels

    def assistant_char_spans(self, messages: list[Message]) -> list[tuple[int, int]]:
        """Character spans of the rendered conversation that the model is trained to produce.

        Each span runs from the assistant's first content character to the end of what the template appends for that
        turn (its end-of-turn token included, so the model learns to stop), trailing whitespace excluded.
        """
        full = self.render(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True) if i else ""
            upto = self.render(messages[: i + 1], add_generation_prompt=False)
            if not (upto.startswith(before) and full.startswith(upto)):
                raise ValueError(
                    f"the chat template does not render turn {i} as an extension of the earlier turns, so assistant "
                    "labels cannot be derived from it; use a template that renders conversations incrementally"
                )
            segment = upto[len(before):]
            content = message["content"].strip()
            start = segment.find(content) if content else -1
            start = max(start, 0)  # a template that rewrites content: supervise its whole turn
            end = len(segment.rstrip())
            if end > start:
                spans.append((len(before) + start, len(before) + end))
        return spans

    def encode_conversation(self, messages: list[Message], num_images: int) -> Encoded | None:
        """Tokenize a training conversation with labels only on assistant tokens.

        Returns:
            The encoded sample, or None when it cannot be trained on: truncation to ``max_length`` would cut visual
            tokens, or leaves no supervised token.
        """
        messages = [{"role": m["role"], "content": self.content_text(m["content"])} for m in messages]
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("a training conversation needs at least one assistant turn")
        text = self.render(messages, add_generation_prompt=False)
        self._check_images(text, num_images)
        spans = self.assistant_char_spans(messages)
        enc = self._tokenize(text)
        labels = []
        for tok, (s, e) in zip(enc["input_ids"], enc["offset_mapping"]):
            supervised = any(e > a and s < b for a, b in spans)
            labels.append(tok if supervised else IGNORE_INDEX)
        ids, labels = self._expand(enc["input_ids"], labels)
        if len(ids) > self.max_length:
            last_image = max((i for i, t in enumerate(ids) if t == self.image_token_id), default=-1)
            if last_image >= self.max_length:
                logger.debug("skipping a sample: max_length=%d would cut its visual tokens", self.max_length)
                return None
            ids, labels = ids[: self.max_length], labels[: self.max_length]
        if all(label == IGNORE_INDEX for label in labels[1:]):
            return None
        return Encoded(ids, labels, num_images)

    def encode_independent_turns(self, messages: list[Message], num_images: int) -> Encoded | None:
        """A multi-turn conversation as its question-answer pairs, each asked alone about the image, in one sequence.

        Each pair is rendered as its own single-turn conversation (later questions get the first question's image
        marker, so every pair reads like an inference prompt). The tokens they all start with (system turn, image)
        come once, then each pair's own tokens; ``segments`` and ``position_ids`` let a pair attend to that prefix and
        to itself only, at the positions it would have alone. The sample trains what one single-question sample per
        pair would, for the cost of one image prefix, and no answer can be read off an earlier turn's answer.
        (Written here: transformers' packing, position-id resets, isolates whole sequences, not ones sharing a prefix.)

        Returns:
            The encoded sample, or None when no pair can be trained on. Pairs that would pass ``max_length`` are
            dropped from the end.
        """
        messages = [{"role": m["role"], "content": self.content_text(m["content"])} for m in messages]
        head = []
        while messages and messages[0]["role"] == "system":
            head.append(messages.pop(0))
        roles = [m["role"] for m in messages]
        if not roles or roles != ["user", "assistant"] * (len(roles) // 2):
            raise ValueError(
                "independent turns need alternating user/assistant turns after the system turn, got roles "
                f"{', '.join(roles) or 'none'}"
            )
        lead = ""
        if num_images:
            first = messages[0]["content"]
            at = first.find(self.image_token)
            if at < 0 or any(self.image_token in m["content"] for m in messages[1:]):
                raise ValueError(
                    f"independent turns need the '{self.image_token}' marker in the first user turn and nowhere else"
                )
            end = at + len(self.image_token)
            lead = first[: end + 1] if first[end: end + 1] == "\n" else first[:end]
        pairs = []
        for i in range(0, len(messages), 2):
            user = messages[i]["content"] if i == 0 else lead + messages[i]["content"]
            enc = self.encode_conversation([*head, {"role": "user", "content": user}, messages[i + 1]], num_images)
            if enc is not None:
                pairs.append(enc)
        if not pairs:
            return None
        # The shared prefix: what every pair's render starts with, up to the image (or, without one, up to before
        # the first answer), so each pair's own tokens start before anything it is trained to say.
        last_image = max((i for i, t in enumerate(pairs[0].input_ids) if t == self.image_token_id), default=-1)
        first_label = min(next(i for i, t in enumerate(p.labels) if t != IGNORE_INDEX) for p in pairs)
        limit = last_image + 1 if last_image >= 0 else first_label - 1
        shared = 0
        while shared < limit and len({p.input_ids[shared] for p in pairs}) == 1:
            shared += 1
        if shared <= last_image:  # e.g. a question that merges into the marker's token: pairs would need the image twice
            raise ValueError("independent turns: the pairs' renders do not share the image tokens")
        ids, labels = list(pairs[0].input_ids[:shared]), list(pairs[0].labels[:shared])
        segments, positions = [0] * shared, list(range(shared))
        for k, p in enumerate(pairs, start=1):
            tail = len(p.input_ids) - shared
            if len(ids) + tail > self.max_length:
                break
            ids += p.input_ids[shared:]
            labels += p.labels[shared:]  # its first label is IGNORE_INDEX (shared < first_label), as it must be: the
            # token before it, the previous pair's last, cannot see this pair
            segments += [k] * tail
            positions += range(shared, shared + tail)
        if len(ids) == shared:
            return None
        return Encoded(ids, labels, num_images, segments=segments, position_ids=positions)

    def encode_prompt(self, prompt: str, history: list[Message] | None = None, has_image: bool = True,
                      reserve: int = 0) -> Encoded:
        """Tokenize an inference prompt, ending with the template's generation prompt.

        When it is longer than ``max_length - reserve``, the oldest earlier turns are dropped first and then the start of
        the user's text; the visual tokens are never cut.
        """
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
        if has_image and prompt.count(self.image_token) > 1:
            raise ValueError(f"the prompt holds {prompt.count(self.image_token)} '{self.image_token}' markers "
                             "for one image; use at most one")
        budget = self.max_length - reserve
        if history is not None and not isinstance(history, (list, tuple)):
            raise TypeError(f"history must be a list of turns, got {type(history).__name__}")
        history = list(history or [])
        while True:
            messages = self.build_messages(prompt, history, has_image)
            text = self.render(messages, add_generation_prompt=True)
            self._check_images(text, int(has_image))
            ids, _ = self._expand(self._tokenize(text)["input_ids"], None)
            overflow = len(ids) - budget
            if overflow <= 0:
                return Encoded(ids, None, int(has_image))
            if len(history) >= 2:
                history = history[2:]  # drop the oldest user/assistant pair; the image moves to the next user turn
                continue
            prompt_ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            keep = [t for t in prompt_ids if t == self.image_token_id]
            text_ids = [t for t in prompt_ids if t != self.image_token_id]
            if len(text_ids) <= 1:
                raise ValueError(
                    f"the prompt does not fit in max_length={self.max_length} (with {reserve} tokens reserved for the "
                    f"answer) even with its text removed: {self.num_image_tokens} visual tokens per image"
                )
            cut = min(len(text_ids) - 1, overflow + 2)
            logger.warning("prompt is longer than the context: dropping its first %d text tokens", cut)
            prompt = self.tokenizer.decode(keep + text_ids[cut:], skip_special_tokens=False)

    # ----------------------------------------------------------------------------------------------- batching
    def pixel_values(self, images: list) -> torch.Tensor:
        """Images (RGB PIL) -> ``[N, 3, H, W]`` with the tower's own preprocessing (extreme shapes bounded first)."""
        images = [bound_aspect(img, self._input_side) for img in images]
        return self.image_processor(images=images, return_tensors="pt")["pixel_values"]

    @property
    def _input_side(self) -> int:
        sides = []
        for attr in ("size", "crop_size"):
            size = getattr(self.image_processor, attr, None)  # a dict, or transformers' SizeDict
            for key in ("height", "width", "shortest_edge"):
                value = size.get(key) if isinstance(size, dict) else getattr(size, key, None)
                if isinstance(value, int):
                    sides.append(value)
        return max(sides, default=224)

    def pad(self, samples: list[Encoded], padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Pad to the longest sample. Training pads right; batched generation pads left."""
        width = max(len(s.input_ids) for s in samples)
        pad_id = self.tokenizer.pad_token_id
        ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(samples), width), dtype=torch.long)
        has_labels = samples[0].labels is not None
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long) if has_labels else None
        for row, s in enumerate(samples):
            n = len(s.input_ids)
            sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
            ids[row, sl] = torch.tensor(s.input_ids)
            mask[row, sl] = 1
            if has_labels:
                labels[row, sl] = torch.tensor(s.labels)
        batch = {"input_ids": ids, "attention_mask": mask}
        if samples[0].segments is not None:  # encode_independent_turns: a 4D mask and explicit positions
            segments = torch.full((len(samples), width), -1, dtype=torch.long)
            positions = torch.zeros((len(samples), width), dtype=torch.long)
            for row, s in enumerate(samples):
                n = len(s.input_ids)
                sl = slice(0, n) if padding_side == "right" else slice(width - n, width)
                segments[row, sl] = torch.tensor(s.segments)
                positions[row, sl] = torch.tensor(s.position_ids)
            query, key = segments[:, :, None], segments[:, None, :]  # [B, T, 1], [B, 1, T]
            same = (key == 0) | (key == query)
            causal = torch.ones(width, width, dtype=torch.bool).tril()
            batch["attention_mask"] = (same & causal & mask.bool()[:, None, :])[:, None]  # [B, 1, T, T]: True = see
            batch["position_ids"] = positions
        if has_labels:
            batch["labels"] = labels
        return batch

    def _stop_token_ids(self) -> list[int]:
        """EOS plus the template's own end-of-turn token (e.g. ``<|im_end|>``, ``<|eot_id|>``), read off a render."""
        stops = [self.tokenizer.eos_token_id] if self.tokenizer.eos_token_id is not None else []
        probe = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "xyzzy"}]
        try:
            text = self.render(probe, add_generation_prompt=False)
        except Exception:  # a template that insists on other roles: EOS alone
            return stops
        tail = text[text.rfind("xyzzy") + len("xyzzy"):].strip()
        if tail:
            first = self.tokenizer(tail, add_special_tokens=False)["input_ids"][:1]
            if first and first[0] in set(self.tokenizer.all_special_ids) | set(self.tokenizer.added_tokens_decoder):
                stops += [t for t in first if t not in stops]
        return stops
