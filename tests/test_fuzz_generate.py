"""Property-based tests (hypothesis) of ``VLMChat.generate`` / ``stream`` / ``caption`` inputs on a tiny random model.

Whatever the prompt, image, history or generation keywords, a call ends in a clean answer (a string) or in a
``ValueError`` / ``TypeError`` whose message names the argument at fault (a missing image file: ``FileNotFoundError``
naming it); never another exception type and never a hang (every call generates at most a few tokens, under the
suite's timeout). Where the outcome is known from the input alone (empty prompts, ``<image>`` markers against the
images given), the property checks that exact outcome.

Run ``pytest tests/test_fuzz_generate.py --hypothesis-show-statistics`` to see how many cases each property ran and how
they ended (the ``event`` lines: answered / refused with which exception).
"""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from hypothesis import HealthCheck, currently_in_test_context, event, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from PIL import Image

from vlm_chat import VLMChat

pytestmark = pytest.mark.timeout(600)

# No example database: a run writes nothing into the checkout (a failure prints its reproducing example instead).
FUZZ = settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
FEW = {"max_new_tokens": 2}  # enough to show the model ran; keeps each case in milliseconds
MARKER = "<image>"


@pytest.fixture(scope="module")
def chat(tiny_clip_dir, tiny_llama_dir) -> VLMChat:
    return VLMChat.from_components(str(tiny_clip_dir), str(tiny_llama_dir), device="cpu")


@pytest.fixture(scope="module")
def picture() -> Image.Image:
    return Image.new("RGB", (40, 30), (200, 30, 30))


def outcome(call, names: tuple[str, ...], allowed: tuple[type[BaseException], ...] = (ValueError, TypeError)):
    """Run ``call``; return the answer, or the refusal after checking it is a clear one.

    A refusal must be one of ``allowed`` and its message must name one of ``names`` (the argument at fault). Anything
    else propagates and fails the property with hypothesis's reproducing example.
    """
    try:
        answer = call()
    except allowed as e:
        message = str(e)
        assert message and any(n.lower() in message.lower() for n in names), (type(e).__name__, message, names)
        _event(f"refused: {type(e).__name__}")
        return e
    assert isinstance(answer, str), type(answer)
    _event("answered")
    return answer


def _event(name: str) -> None:
    if currently_in_test_context():  # hypothesis counts events per property; plain tests use outcome() too
        event(name)


# ---------------------------------------------------------------------------------------------------------- prompts

pieces = st.text(max_size=40) | st.sampled_from(["", " ", "\n", "\u3000", "\x00", "\ufeff", "🎨", "\u200d", "<", ">"])
prompts = st.one_of(
    st.text(max_size=200),  # arbitrary unicode (every category hypothesis draws, control characters included)
    st.lists(pieces, max_size=6).map(MARKER.join),  # literal <image> markers anywhere, 0..5 of them
    st.text(min_size=1, max_size=8).map(lambda s: s * 2500),  # huge: up to 20,000 characters
    st.sampled_from(["", "   ", "\t\n", MARKER, f"{MARKER}{MARKER}", f" {MARKER} "]),
)


@FUZZ
@given(prompt=prompts, with_image=st.booleans(), entry=st.sampled_from(["generate", "stream"]))
def test_any_prompt_is_answered_or_refused_as_predicted(chat, picture, prompt, with_image, entry):
    image = picture if with_image else None
    markers = prompt.count(MARKER)
    run = (lambda: chat.generate(image, prompt, **FEW)) if entry == "generate" else (
        lambda: "".join(chat.stream(image, prompt, **FEW)))
    result = outcome(run, ("prompt", MARKER, "max_length"))
    if not prompt.strip():
        assert isinstance(result, ValueError) and "prompt is empty" in str(result)
    elif markers > int(with_image):
        assert isinstance(result, ValueError) and f"{markers} '{MARKER}' marker" in str(result), result
    else:
        assert isinstance(result, str), result  # a valid prompt, however odd or long, is answered


@FUZZ
@given(prompt=st.one_of(st.none(), st.integers(), st.binary(max_size=8), st.lists(st.text(max_size=3), max_size=2)))
def test_a_prompt_that_is_not_a_string_is_a_type_error(chat, picture, prompt):
    result = outcome(lambda: chat.generate(picture, prompt, **FEW), ("prompt",))
    assert isinstance(result, TypeError) and f"got {type(prompt).__name__}" in str(result)


# ---------------------------------------------------------------------------------------------------------- images

MODES = ["1", "L", "P", "RGB", "RGBA", "CMYK", "YCbCr", "LAB", "HSV", "I", "F", "LA", "PA", "La", "RGBa", "I;16"]
pil_images = st.builds(
    lambda mode, w, h: Image.new(mode, (w, h)),
    st.sampled_from(MODES),
    st.integers(0, 300) | st.sampled_from([1, 2000, 9000]),
    st.integers(0, 300) | st.sampled_from([1, 3]),
)
dtypes = st.sampled_from([np.uint8, np.int8, np.uint16, np.int16, np.int32, np.uint32, np.int64, np.float16,
                          np.float32, np.float64, np.bool_, np.complex64, np.dtype("U1"), np.dtype("datetime64[s]")])
arrays = dtypes.flatmap(
    lambda dt: hnp.arrays(dt, hnp.array_shapes(min_dims=0, max_dims=5, min_side=0, max_side=6))
    | hnp.arrays(dt, st.sampled_from([(8, 8), (8, 8, 3), (8, 8, 4), (3, 8, 8), (8, 8, 1), (1, 8, 8), (8, 8, 2)]))
)


def _png(size=(6, 5)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (0, 128, 255)).save(buf, format="PNG")
    return buf.getvalue()


not_images = st.one_of(
    st.binary(max_size=64),  # random bytes
    st.binary(max_size=64).map(lambda b: _png()[:16] + b),  # a PNG signature and header, then junk
    st.integers(1, 60).map(lambda n: _png()[:-n]),  # a truncated PNG
    st.sampled_from([b"", bytearray(b"GIF89a"), memoryview(b"\x89PNG\r\n\x1a\n")]),
)
paths = st.sampled_from(["", ".", "/", "/dev/null", "/etc/hostname", "/nonexistent/cat.png", "фото 😀.png"])
others = st.one_of(st.integers(), st.floats(), st.lists(st.integers(0, 255), max_size=3), st.dictionaries(
    st.text(max_size=2), st.integers(), max_size=2), st.just(object()))


@FUZZ
@given(image=st.one_of(pil_images, arrays, not_images, paths, others), entry=st.sampled_from(["generate", "caption"]))
def test_any_image_is_answered_or_refused_naming_the_image(chat, image, entry):
    run = (lambda: chat.generate(image, "What is it?", **FEW)) if entry == "generate" else (
        lambda: chat.caption(image, **FEW))
    allowed = (ValueError, TypeError, FileNotFoundError) if isinstance(image, str) else (ValueError, TypeError)
    outcome(run, ("image",), allowed)


@FUZZ
@given(image=arrays)
def test_a_valid_image_array_is_answered(chat, image):
    """The arrays ``load_image`` documents (HxW, HxWx3/4 channels last or CHW; uint8, other integers, bool, floats in
    [0, 1]) are answered; only the others are refused."""
    a = image
    if a.ndim == 3 and a.shape[0] in (1, 3, 4) and a.shape[-1] not in (1, 3, 4):
        a = np.moveaxis(a, 0, -1)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    valid_shape = a.size > 0 and (a.ndim == 2 or (a.ndim == 3 and a.shape[-1] in (3, 4)))
    floats = np.issubdtype(a.dtype, np.floating)
    valid_values = (not floats) or (a.size > 0 and bool(np.isfinite(a).all()) and a.min() >= 0 and a.max() <= 1)
    valid_dtype = floats or a.dtype == np.bool_ or np.issubdtype(a.dtype, np.integer)
    result = outcome(lambda: chat.generate(image, "What is it?", **FEW), ("image",))
    assert isinstance(result, str) == (valid_shape and valid_values and valid_dtype), (image.dtype, image.shape, result)


# ---------------------------------------------------------------------------------------------------------- history

roles = st.sampled_from(["user", "assistant", "system", "bot", "", "USER"]) | st.none() | st.integers()
contents = st.text(max_size=30) | st.none() | st.integers() | st.lists(st.text(max_size=5), max_size=2) | st.just(
    f"{MARKER} earlier")
turns = st.one_of(
    st.fixed_dictionaries({"role": roles, "content": contents}),
    st.dictionaries(st.sampled_from(["role", "content", "from", "value", "images"]), contents, max_size=3),
    st.text(max_size=5), st.integers(), st.none(), st.lists(st.text(max_size=3), max_size=2),
)
valid_pairs = st.lists(st.tuples(st.text(max_size=30), st.text(max_size=30)), max_size=3).map(
    lambda pairs: [t for u, a in pairs for t in ({"role": "user", "content": u}, {"role": "assistant", "content": a})])
histories = st.one_of(valid_pairs, st.lists(turns, max_size=5), st.text(max_size=5), st.integers(), st.dictionaries(
    st.text(max_size=3), st.text(max_size=3), max_size=2), st.tuples(turns))


@FUZZ
@given(history=histories, with_image=st.booleans())
def test_any_history_is_answered_or_refused_naming_it(chat, picture, history, with_image):
    image = picture if with_image else None
    outcome(lambda: chat.generate(image, "And now?", history=history, **FEW), ("history", MARKER, "max_length"))


# ---------------------------------------------------------------------------------------------------------- kwargs

numbers = st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True, allow_infinity=True), st.booleans(),
                    st.none(), st.text(max_size=3))
GEN_KEYS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "num_beams", "do_sample",
            "repetition_penalty", "no_repeat_ngram_size", "num_return_sequences", "length_penalty", "max_length",
            "max_new_token", "temprature", "beams"]  # the documented keys and misspellings (token ids: not fuzzed)


@FUZZ
@given(kwargs=st.dictionaries(st.sampled_from(GEN_KEYS), numbers, min_size=1, max_size=3))
@example(kwargs={"do_sample": True, "temperature": 1e-300})  # NaN probabilities in sampling, before the fix
@example(kwargs={"max_new_tokens": None})  # reached the prompt budget as None, before the fix
@example(kwargs={"num_beams": 2.0})  # repeat_interleave() deep in transformers, before the fix
@example(kwargs={"repetition_penalty": 2})  # "`penalty` has to be a strictly positive float", before the fix
def test_any_generation_keywords_are_answered_or_refused_naming_one(chat, picture, kwargs):
    # Bound the work a valid setting can ask for, so the property tests refusals, not patience: the keys that set a
    # length or a beam count get at most a few units when the value is a sane positive integer.
    bounded = dict(kwargs)
    for key in ("max_new_tokens", "min_new_tokens", "num_beams", "num_return_sequences", "max_length"):
        value = bounded.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and 0 < value and key != "max_length":
            bounded[key] = min(value, 3)
    bounded.setdefault("max_new_tokens", 2)  # (the library default, 64, also beats any max_length given)
    outcome(lambda: chat.generate(picture, "What is it?", **bounded), tuple(kwargs))


@pytest.mark.parametrize("value", [10**6, 10**12, math.inf, -1, 0, 2.5, "8", None])
def test_max_new_tokens_beyond_reason_is_refused_not_run(chat, picture, value):
    """Without a bound, ``max_new_tokens=10**12`` would generate until the heat death of the machine."""
    outcome(lambda: chat.generate(picture, "What is it?", max_new_tokens=value), ("max_new_tokens", "max_length"))
