"""Generation settings shared by every way of generating (``VLMChat.generate``/``stream``, the prefix-cached
evaluation, the API's batcher): the checked ``GenerationConfig`` and the stop-on-event criterion."""

from __future__ import annotations

import difflib
import functools
import math
import threading
from typing import Any

import torch
from transformers import GenerationConfig, StoppingCriteria


class EventStop(StoppingCriteria):
    """Ends every row of a generation once one of ``events`` is set: checked after each new token."""

    def __init__(self, *events: threading.Event | None):
        self.events = [e for e in events if e is not None]

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        stop = any(e.is_set() for e in self.events)
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)



#: Generation keywords checked before transformers sees them: transformers accepts a string, a float or a negative
#: count for most of these and fails deep inside ``generate`` with an error that names no keyword (``'>' not supported
#: between 'int' and 'str'``, ``repeat_interleave() received an invalid combination of arguments``).
_INT_SETTINGS = {"max_new_tokens": 1, "min_new_tokens": 0, "max_length": 1, "min_length": 0, "num_beams": 1,
                 "num_return_sequences": 1, "top_k": 0, "no_repeat_ngram_size": 0}
_FLOAT_SETTINGS = {"temperature": (0.0, False), "top_p": (0.0, True), "repetition_penalty": (0.0, True),
                   "length_penalty": (-math.inf, False)}  # key: (lower bound, whether the bound is excluded)
_CHECKED_SETTINGS = {*_INT_SETTINGS, *_FLOAT_SETTINGS, "do_sample"}
#: Sampling divides the logits by the temperature: below this, float32 logits overflow and sampling fails on NaN
#: probabilities (temperature=1e-300 did: found by tests/test_fuzz_generate.py). Such a temperature is greedy anyway.
_MIN_TEMPERATURE = 1e-5


def check_generation_value(key: str, value: Any) -> None:
    """Refuse a wrongly typed or out-of-range value of a common generation keyword, naming it (None: the default)."""
    if value is None:
        return
    if key in _INT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{key} must be an integer, got {type(value).__name__} {value!r}")
        if value < _INT_SETTINGS[key]:
            raise ValueError(f"{key} must be >= {_INT_SETTINGS[key]}, got {value}")
    elif key in _FLOAT_SETTINGS:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{key} must be a number, got {type(value).__name__} {value!r}")
        low, strict = _FLOAT_SETTINGS[key]
        if not math.isfinite(value) or value < low or (strict and value == low) or (key == "top_p" and value > 1):
            bound = "in (0, 1]" if key == "top_p" else f"{'>' if strict else '>='} {low}" if low > -math.inf else ""
            raise ValueError(f"{key} must be a finite number {bound}, got {value!r}".replace("  ", " "))
        if key == "temperature" and 0 < value < _MIN_TEMPERATURE:
            raise ValueError(f"temperature must be 0 (greedy) or at least {_MIN_TEMPERATURE:g}, got {value!r}")
    elif key == "do_sample" and not isinstance(value, bool):
        raise TypeError(f"do_sample must be True or False, got {type(value).__name__} {value!r}")



@functools.cache
def _known_generation_keys() -> frozenset[str]:
    """The keywords ``GenerationConfig`` knows (the same for every request, so built once)."""
    return frozenset(GenerationConfig().to_dict())


def build_generation_config(processor: Any, kwargs: dict[str, Any]) -> GenerationConfig:
    """Greedy decoding with ``processor``'s stop tokens and the image token suppressed, updated by ``kwargs``.

    Args:
        processor: The model's :class:`~vlm_chat.prompting.VLMProcessor`.
        kwargs: transformers generation keywords; unknown ones and wrongly typed / out-of-range values are errors.

    Returns:
        The ``GenerationConfig``.
    """
    tok = processor.tokenizer
    settings = {
        "max_new_tokens": 64,
        "do_sample": False,
        "eos_token_id": processor.stop_token_ids,
        "pad_token_id": tok.pad_token_id,
        "suppress_tokens": [processor.image_token_id],  # never emit the placeholder itself
    }
    known = _known_generation_keys()
    unknown = sorted(set(kwargs) - known)
    if unknown:
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, known, 1)) else repr(k)
                 for k in unknown]
        raise TypeError(f"unknown generation keyword(s): {', '.join(hints)}")
    for key, value in kwargs.items():
        check_generation_value(key, value)
    # None for a checked keyword means "the default" (max_new_tokens=None used to reach the prompt budget as None).
    settings.update({k: v for k, v in kwargs.items() if v is not None or k not in _CHECKED_SETTINGS})
    # transformers' logits processors refuse an int where they expect a float (repetition_penalty=2 did: found by
    # tests/test_fuzz_generate.py); the checks above accepted it as a number, so pass it on as one.
    settings.update({k: float(v) for k, v in settings.items() if k in _FLOAT_SETTINGS and type(v) is int})
    if not settings["do_sample"]:
        # Greedy/beam decoding ignores these; dropping them avoids transformers' warnings about them.
        for key in ("temperature", "top_p", "top_k"):
            settings.pop(key, None)
    return GenerationConfig(**settings)
