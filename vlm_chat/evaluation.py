"""Evaluation: VQA accuracy, POPE hallucination metrics, caption BLEU-4/CIDEr, and stage-0 encoder metrics.

Each metric is a pure function over plain values (responses and answers, label lists, embedding tensors), so it can
be checked by hand; each ``evaluate_*`` runner only adds the model calls around it. See docs/evaluation.md.
"""

from __future__ import annotations

import logging
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

_ARTICLES = {"a", "an", "the"}
# The VQA evaluation's number handling: spelled-out numbers count as digits.
_NUMBER_WORDS = {
    "none": "0",
    "zero": "0",
    "one": "1",
    "two": "2",
    "three": "3",
    "four": "4",
    "five": "5",
    "six": "6",
    "seven": "7",
    "eight": "8",
    "nine": "9",
    "ten": "10",
}
_APOSTROPHES = re.compile(r"['\u2019`]")
_NON_WORD = re.compile(r"[^a-z0-9]+")


# --------------------------------------------------------------------------------------------------------------------
# Text normalization


def normalize_answer(text: str) -> str:
    """Lowercase, drop apostrophes, turn other punctuation into spaces, drop articles, spell numbers as digits.

    ``"The shape is Red."`` -> ``"shape is red"``; ``"Top-left"`` -> ``"top left"``; ``"Three!"`` -> ``"3"``.
    """
    text = _NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower()))
    return " ".join(_NUMBER_WORDS.get(w, w) for w in text.split() if w not in _ARTICLES)


def extract_answer(response: str, vocabulary: Iterable[str]) -> str | None:
    """The first vocabulary entry that occurs in the normalized response, scanning left to right.

    Multi-word entries (``"top left"``) match as whole phrases; at one position the longest entry wins. Matching is on
    whole words, so ``"no"`` does not match inside ``"not"``.

    Args:
        response: The model's text.
        vocabulary: The possible answers.

    Returns:
        The matching entry, normalized with :func:`normalize_answer`; ``None`` if no entry occurs.
    """
    phrases = sorted({tuple(normalize_answer(v).split()) for v in vocabulary} - {()}, key=len, reverse=True)
    words = normalize_answer(response).split()
    for i in range(len(words)):
        for phrase in phrases:
            if tuple(words[i : i + len(phrase)]) == phrase:
                return " ".join(phrase)
    return None


def infer_answer_type(answer: str) -> str:
    """``"yes/no"``, ``"number"`` or ``"other"`` (the VQA breakdown) for an answer without an explicit type."""
    norm = normalize_answer(answer)
    if norm in ("yes", "no"):
        return "yes/no"
    return "number" if norm.isdigit() else "other"


def load_eval_jsonl(
    path: str | os.PathLike,
    required: Sequence[str] = ("image", "question"),
    image_folder: str | os.PathLike | None = None,
) -> list[dict[str, Any]]:
    """Read evaluation rows (``vqa.jsonl``, ``pope.jsonl`` as written by :func:`vlm_chat.shapes.write_records`).

    Args:
        path: The JSONL file.
        required: Fields every row must have (e.g. add ``"answer"`` for VQA, ``"label"`` for POPE).
        image_folder: Folder the relative ``image`` paths live in; default: the file's directory.

    Returns:
        The rows as dicts, ``image`` made an absolute path.

    Raises:
        ValueError: A malformed line or a missing field, naming the file and line.
        FileNotFoundError: The file or a row's image does not exist.
    """
    import json

    path = os.fspath(path)
    folder = os.fspath(image_folder) if image_folder is not None else os.path.dirname(os.path.abspath(path))
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {lineno}: malformed JSON ({e.msg})") from e
            if not isinstance(row, dict):
                raise ValueError(f"{path}, line {lineno}: expected a JSON object, got {type(row).__name__}")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}, line {lineno}: missing field(s) {missing}")
            if "image" in row:
                image = os.path.join(folder, row["image"])
                if not os.path.isfile(image):
                    raise FileNotFoundError(f"{path}, line {lineno}: image {image} does not exist")
                row["image"] = os.path.abspath(image)
            rows.append(row)
    return rows


# --------------------------------------------------------------------------------------------------------------------
# VQA accuracy


def vqa_scores(
    responses: Sequence[str],
    answers: Sequence[str],
    answer_types: Sequence[str] | None = None,
    vocabulary: Iterable[str] | None = None,
) -> dict[str, Any]:
    """VQA accuracy judged by the first answer-vocabulary word of each normalized response.

    Args:
        responses: Model outputs.
        answers: Ground-truth answers (one per response).
        answer_types: Type per sample for the breakdown; default: :func:`infer_answer_type`.
        vocabulary: The answer vocabulary; default: the set of ``answers``.

    Returns:
        ``{"accuracy", "n", "correct", "unanswered" (responses with no vocabulary word), "by_type": {type:
        {"accuracy", "n"}}, "extracted": [the judged answer or None per sample]}``.
    """
    if len(responses) != len(answers):
        raise ValueError(f"got {len(responses)} responses for {len(answers)} answers")
    if answer_types is not None and len(answer_types) != len(answers):
        raise ValueError(f"got {len(answer_types)} answer types for {len(answers)} answers")
    vocab = list(vocabulary) if vocabulary is not None else sorted(set(answers))
    types = list(answer_types) if answer_types is not None else [infer_answer_type(a) for a in answers]
    extracted = [extract_answer(r, vocab) for r in responses]
    hits = [e is not None and e == normalize_answer(a) for e, a in zip(extracted, answers)]
    by_type: dict[str, list[bool]] = defaultdict(list)
    for t, h in zip(types, hits):
        by_type[t].append(h)
    n = len(hits)
    return {
        "accuracy": sum(hits) / n if n else 0.0,
        "n": n,
        "correct": sum(hits),
        "unanswered": sum(e is None for e in extracted),
        "by_type": {t: {"accuracy": sum(v) / len(v), "n": len(v)} for t, v in sorted(by_type.items())},
        "extracted": extracted,
    }


def _field(sample: Any, name: str, index: int, required: bool = True) -> Any:
    if isinstance(sample, Mapping):
        if name in sample:
            return sample[name]
    elif hasattr(sample, name):
        return getattr(sample, name)
    if required:
        raise ValueError(f"samples[{index}] has no {name!r} field (got {type(sample).__name__})")
    return None


def _image_key(image: Any) -> Any:
    if isinstance(image, (str, os.PathLike)):
        return ("path", os.path.abspath(os.fspath(image)))
    return ("object", id(image))


def _generate_grouped(
    chat: Any,
    images: Sequence[Any],
    prompts: Sequence[str],
    batch_size: int,
    desc: str,
    progress: bool,
    **generate_kwargs: Any,
) -> list[str]:
    """Answer ``prompts`` about ``images`` in batches of questions grouped by image; results in input order.

    Grouping puts an image's questions into the same batch (the image is loaded once per batch and the same object is
    passed for each of its questions), which is what lets a model share the work of the image prefix.
    """
    from vlm_chat.images import load_image

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    groups: dict[Any, list[int]] = {}
    for i, image in enumerate(images):
        groups.setdefault(_image_key(image), []).append(i)
    order = [i for idx in groups.values() for i in idx]
    responses: list[str | None] = [None] * len(prompts)
    bar = tqdm(total=len(order), desc=desc, disable=not progress, unit="q")
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        loaded: dict[Any, Any] = {}
        batch_images = []
        for i in chunk:
            key = _image_key(images[i])
            if key not in loaded:
                try:
                    loaded[key] = load_image(images[i])
                except (OSError, ValueError, TypeError) as e:
                    raise type(e)(f"sample {i}: cannot load image {images[i]!r}: {e}") from e
            batch_images.append(loaded[key])
        outputs = chat.generate_batch(batch_images, [prompts[i] for i in chunk], **generate_kwargs)
        if len(outputs) != len(chunk):
            raise RuntimeError(f"generate_batch returned {len(outputs)} texts for {len(chunk)} prompts")
        for i, text in zip(chunk, outputs):
            responses[i] = text
        bar.update(len(chunk))
    bar.close()
    return responses  # type: ignore[return-value]


def evaluate_vqa(
    chat: Any,
    samples: Sequence[Any],
    batch_size: int = 16,
    max_new_tokens: int = 8,
    vocabulary: Iterable[str] | None = None,
    prompt_template: str = "{question}",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Ask a model every question and score it with :func:`vqa_scores`.

    Args:
        chat: A ``VLMChat`` (anything with ``generate_batch(images, prompts, **kw) -> list[str]``).
        samples: Mappings or objects with ``image`` (path or PIL image), ``question``, ``answer`` and optionally
            ``answer_type`` (e.g. :func:`vlm_chat.easyvqa.quick_eval_subset`).
        batch_size: Questions per ``generate_batch`` call.
        max_new_tokens: Generation length; answers are one or two words.
        vocabulary: Answer vocabulary; default: the set of the samples' answers (for easy-VQA, the 13 answers).
        prompt_template: Turns a question into the prompt (``"{question}"``: as is).
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords (default decoding is greedy).

    Returns:
        :func:`vqa_scores`'s dict without ``extracted``, plus ``"predictions"``: per sample, in input order,
        ``{"image", "question", "answer", "answer_type", "response", "prediction", "correct"}``.
    """
    images = [_field(s, "image", i) for i, s in enumerate(samples)]
    questions = [_field(s, "question", i) for i, s in enumerate(samples)]
    answers = [_field(s, "answer", i) for i, s in enumerate(samples)]
    types = [_field(s, "answer_type", i, required=False) for i, s in enumerate(samples)]
    types = [t if t is not None else infer_answer_type(a) for t, a in zip(types, answers)]
    prompts = [prompt_template.format(question=q) for q in questions]
    responses = _generate_grouped(
        chat, images, prompts, batch_size, "VQA", progress, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    scores = vqa_scores(responses, answers, types, vocabulary)
    extracted = scores.pop("extracted")
    scores["predictions"] = [
        {
            "image": img if isinstance(img, (str, os.PathLike)) else None,
            "question": q,
            "answer": a,
            "answer_type": t,
            "response": r,
            "prediction": e,
            "correct": e is not None and e == normalize_answer(a),
        }
        for img, q, a, t, r, e in zip(images, questions, answers, types, responses, extracted)
    ]
    logger.info(
        "VQA accuracy %.4f on %d questions (%d unanswered)", scores["accuracy"], scores["n"], scores["unanswered"]
    )
    return scores


# --------------------------------------------------------------------------------------------------------------------
# POPE


def parse_yes_no(response: str) -> str | None:
    """``"yes"`` or ``"no"``: whichever of the two words comes first in the normalized response; ``None`` if neither."""
    return extract_answer(response, ("yes", "no"))


def pope_metrics(responses: Sequence[str], labels: Sequence[str]) -> dict[str, float]:
    """POPE's metrics with "yes" (the object is there) as the positive class.

    A response with neither "yes" nor "no" counts as "no" (it does not claim the object) and is counted in
    ``unparsed``.

    Args:
        responses: Model outputs.
        labels: ``"yes"`` / ``"no"`` ground truth per response.

    Returns:
        ``{"accuracy", "precision", "recall", "f1", "yes_ratio", "n", "unparsed"}``; precision (recall) is 0 when
        nothing is predicted (labelled) yes.
    """
    if len(responses) != len(labels):
        raise ValueError(f"got {len(responses)} responses for {len(labels)} labels")
    bad = sorted({lab for lab in labels if lab not in ("yes", "no")})
    if bad:
        raise ValueError(f"labels must be 'yes' or 'no', got {bad}")
    parsed = [parse_yes_no(r) for r in responses]
    pred = [p == "yes" for p in parsed]
    gold = [lab == "yes" for lab in labels]
    tp = sum(p and g for p, g in zip(pred, gold))
    fp = sum(p and not g for p, g in zip(pred, gold))
    fn = sum(g and not p for p, g in zip(pred, gold))
    tn = sum(not p and not g for p, g in zip(pred, gold))
    n = len(labels)
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    return {
        "accuracy": (tp + tn) / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
        "yes_ratio": (tp + fp) / n if n else 0.0,
        "n": n,
        "unparsed": sum(p is None for p in parsed),
    }


def evaluate_pope(
    chat: Any,
    samples: Sequence[Any],
    batch_size: int = 16,
    max_new_tokens: int = 4,
    prompt_template: str = "{question}",
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Ask every POPE question and score it with :func:`pope_metrics`, overall and per category.

    Args:
        chat: A ``VLMChat``.
        samples: Mappings or objects with ``image``, ``question``, ``label`` (``"yes"``/``"no"``) and optionally
            ``category`` (``random``/``popular``/``adversarial``), e.g. the rows of a shapes-world ``pope.jsonl``.
        batch_size: Questions per ``generate_batch`` call.
        max_new_tokens: Generation length.
        prompt_template: Turns a question into the prompt.
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords.

    Returns:
        ``{"overall": metrics, "by_category": {category: metrics}, "predictions": [{"question", "label",
        "category", "response"}]}``.
    """
    images = [_field(s, "image", i) for i, s in enumerate(samples)]
    questions = [_field(s, "question", i) for i, s in enumerate(samples)]
    labels = [_field(s, "label", i) for i, s in enumerate(samples)]
    categories = [_field(s, "category", i, required=False) or "all" for i, s in enumerate(samples)]
    prompts = [prompt_template.format(question=q) for q in questions]
    responses = _generate_grouped(
        chat, images, prompts, batch_size, "POPE", progress, max_new_tokens=max_new_tokens, **generate_kwargs
    )
    by_category = {}
    for category in sorted(set(categories)):
        idx = [i for i, c in enumerate(categories) if c == category]
        by_category[category] = pope_metrics([responses[i] for i in idx], [labels[i] for i in idx])
    overall = pope_metrics(responses, labels)
    logger.info("POPE F1 %.4f accuracy %.4f yes-ratio %.3f", overall["f1"], overall["accuracy"], overall["yes_ratio"])
    return {
        "overall": overall,
        "by_category": by_category,
        "predictions": [
            {"question": q, "label": lab, "category": c, "response": r}
            for q, lab, c, r in zip(questions, labels, categories, responses)
        ],
    }


# --------------------------------------------------------------------------------------------------------------------
# Captions


def caption_tokenize(text: str) -> str:
    """Lowercase words and digits separated by single spaces: a Java-free stand-in for the PTB tokenizer that
    pycocoevalcap normally runs (punctuation is dropped, as PTBTokenizer's coco setting does)."""
    return " ".join(_NON_WORD.sub(" ", _APOSTROPHES.sub("", text.lower())).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, Any]:
    """Corpus BLEU-1..4 and CIDEr-D of candidate captions against references, with pycocoevalcap's scorers.

    Args:
        candidates: One generated caption per image.
        references: One or more reference captions per image.

    Returns:
        ``{"bleu4", "cider", "bleu": [BLEU-1, ..., BLEU-4], "cider_per_image": [...], "n"}``. CIDEr's document
        frequencies come from the references of all images, so score a whole set at once (with one image every
        n-gram occurs in every document and CIDEr is 0).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider

    if len(candidates) != len(references):
        raise ValueError(f"got {len(candidates)} candidates for {len(references)} reference lists")
    if not candidates:
        raise ValueError("caption_scores needs at least one caption")
    gts, res = {}, {}
    for i, (cand, refs) in enumerate(zip(candidates, references)):
        if isinstance(refs, str) or not refs:
            raise ValueError(f"references[{i}] must be a non-empty list of captions, got {refs!r}")
        gts[i] = [caption_tokenize(r) for r in refs]
        res[i] = [caption_tokenize(cand)]
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, per_image = Cider().compute_score(gts, res)
    return {
        "bleu4": float(bleu[3]),
        "cider": float(cider),
        "bleu": [float(b) for b in bleu],
        "cider_per_image": [float(c) for c in per_image],
        "n": len(candidates),
    }


def evaluate_captions(
    chat: Any,
    items: Sequence[Any],
    detailed: bool = False,
    batch_size: int = 8,
    max_new_tokens: int = 64,
    prompt: str | None = None,
    progress: bool = True,
    **generate_kwargs: Any,
) -> dict[str, Any]:
    """Caption each image and score the captions with :func:`caption_scores`.

    Args:
        chat: A ``VLMChat``.
        items: ``(image, references)`` pairs or mappings with ``image`` and ``references``
            (e.g. :func:`vlm_chat.shapes.reference_captions` of each scene).
        detailed: Ask for detailed captions (the prompt ``VLMChat.caption`` uses for ``detailed=True``).
        batch_size: Images per ``generate_batch`` call.
        max_new_tokens: Caption length limit.
        prompt: The caption request; default: the one ``VLMChat.caption`` sends.
        progress: Show a progress bar.
        **generate_kwargs: More generation keywords.

    Returns:
        :func:`caption_scores`'s dict plus ``"captions"`` (the generated captions, in input order).
    """
    if prompt is None:
        from vlm_chat.chat import CAPTION_PROMPTS

        prompt = CAPTION_PROMPTS[bool(detailed)]
    images, references = [], []
    for i, item in enumerate(items):
        if isinstance(item, Mapping) or hasattr(item, "references"):
            images.append(_field(item, "image", i))
            references.append(list(_field(item, "references", i)))
        else:
            image, refs = item
            images.append(image)
            references.append(list(refs))
    captions = _generate_grouped(
        chat,
        images,
        [prompt] * len(images),
        batch_size,
        "captions",
        progress,
        max_new_tokens=max_new_tokens,
        **generate_kwargs,
    )
    scores = caption_scores(captions, references)
    scores["captions"] = captions
    logger.info("captions: BLEU-4 %.4f CIDEr %.4f on %d images", scores["bleu4"], scores["cider"], scores["n"])
    return scores


# --------------------------------------------------------------------------------------------------------------------
# Stage-0 encoder: zero-shot classification and retrieval


def zero_shot_predictions(image_embeds: torch.Tensor, class_embeds: torch.Tensor) -> torch.Tensor:
    """``[N]`` index of each image's most similar class text (cosine similarity).

    Args:
        image_embeds: ``[N, D]`` image embeddings (normalized here).
        class_embeds: ``[C, D]`` one text embedding per class.
    """
    if image_embeds.ndim != 2 or class_embeds.ndim != 2 or image_embeds.shape[1] != class_embeds.shape[1]:
        raise ValueError(
            f"need [N, D] and [C, D] embeddings, got {tuple(image_embeds.shape)} and {tuple(class_embeds.shape)}"
        )
    sim = (
        torch.nn.functional.normalize(image_embeds.float(), dim=-1)
        @ torch.nn.functional.normalize(class_embeds.float(), dim=-1).T
    )  # [N, C]
    return sim.argmax(dim=1)


def zero_shot_accuracy(image_embeds: torch.Tensor, class_embeds: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of images whose most similar class text (cosine similarity) is their label.

    Args:
        image_embeds: ``[N, D]`` image embeddings (normalized here).
        class_embeds: ``[C, D]`` one text embedding per class.
        labels: ``[N]`` class index per image.

    Returns:
        Top-1 accuracy in [0, 1].
    """
    predicted = zero_shot_predictions(image_embeds, class_embeds)
    labels = torch.as_tensor(labels, device=image_embeds.device)
    if labels.shape != (image_embeds.shape[0],):
        raise ValueError(f"labels must have shape [{image_embeds.shape[0]}], got {tuple(labels.shape)}")
    return (predicted == labels).float().mean().item()


def retrieval_recall(
    similarity: torch.Tensor, positives: torch.Tensor | None = None, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image->text and text->image Recall@k from an image-text similarity matrix.

    A query is a hit at k when one of its positives ranks among its k most similar candidates. The rank of the best
    positive counts every non-positive candidate scoring at least as high, so ties count against the model (a
    constant similarity matrix gets no free hits).

    Args:
        similarity: ``[N_img, N_txt]`` scores.
        positives: ``[N_img, N_txt]`` bool, which texts describe which image; default: the diagonal (text ``i``
            describes image ``i``; the matrix must be square). Every image and text needs at least one positive.
        ks: The cut-offs.

    Returns:
        ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ...}`` in [0, 1].
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be [N_img, N_txt], got shape {tuple(similarity.shape)}")
    sim = similarity.float()
    if positives is None:
        if sim.shape[0] != sim.shape[1]:
            raise ValueError(f"a non-square similarity {tuple(sim.shape)} needs an explicit positives matrix")
        positives = torch.eye(sim.shape[0], dtype=torch.bool, device=sim.device)
    positives = positives.to(device=sim.device, dtype=torch.bool)
    if positives.shape != sim.shape:
        raise ValueError(f"positives has shape {tuple(positives.shape)}, similarity {tuple(sim.shape)}")
    if not positives.any(1).all() or not positives.any(0).all():
        raise ValueError("every image and every text needs at least one positive")

    def ranks(s: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:  # rows are queries
        best = s.masked_fill(~pos, float("-inf")).max(dim=1, keepdim=True).values  # [Q, 1]
        return ((s >= best) & ~pos).sum(dim=1)  # [Q] non-positives at least as similar as the best positive

    i2t, t2i = ranks(sim, positives), ranks(sim.T, positives.T)
    out = {}
    for name, r in (("i2t", i2t), ("t2i", t2i)):
        for k in ks:
            out[f"{name}_r{k}"] = (r < k).float().mean().item()
    return out


def _features(output: Any) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected embedding; older versions a tensor.
    return output if isinstance(output, torch.Tensor) else output.pooler_output


@torch.no_grad()
def encode_images(model: Any, image_processor: Any, images: Sequence[Any], batch_size: int = 64) -> torch.Tensor:
    """``[N, D]`` L2-normalized image embeddings from a ``CLIPModel``/``SiglipModel``'s ``get_image_features``."""
    from vlm_chat.images import load_image

    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        batch = [load_image(im) for im in images[start : start + batch_size]]
        pixels = image_processor(images=batch, return_tensors="pt")["pixel_values"].to(device)
        out.append(
            torch.nn.functional.normalize(_features(model.get_image_features(pixel_values=pixels)).float(), dim=-1)
        )
    return torch.cat(out)  # [N, D]


@torch.no_grad()
def encode_texts(
    model: Any, tokenizer: Any, texts: Sequence[str], batch_size: int = 256, padding: str | bool | None = None
) -> torch.Tensor:
    """``[N, D]`` L2-normalized text embeddings from ``get_text_features``.

    Args:
        padding: Tokenizer padding; default ``"max_length"`` for SigLIP (its text tower pools the last position and
            is trained on max-length padded text) and ``True`` otherwise.
    """
    device = next(model.parameters()).device
    text_config = getattr(model.config, "text_config", None)
    max_len = min(getattr(tokenizer, "model_max_length", 10**6), getattr(text_config, "max_position_embeddings", 10**6))
    if padding is None:
        padding = "max_length" if getattr(model.config, "model_type", "") == "siglip" else True
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            list(texts[start : start + batch_size]),
            padding=padding,
            truncation=True,
            max_length=max_len,
            return_tensors="pt",
        )
        kwargs = {"input_ids": enc["input_ids"].to(device)}
        # SigLIP's convention is max-length padding without a mask (the pad positions are part of what it learned).
        if "attention_mask" in enc and padding != "max_length":
            kwargs["attention_mask"] = enc["attention_mask"].to(device)
        out.append(torch.nn.functional.normalize(_features(model.get_text_features(**kwargs)).float(), dim=-1))
    return torch.cat(out)  # [N, D]


def evaluate_encoder(
    model: Any,
    processor: Any = None,
    caption_items: Sequence[tuple[Any, str]] | None = None,
    class_items: Sequence[tuple[Any, int | str]] | None = None,
    class_names: Sequence[str] | None = None,
    class_template: str = "{}",
    batch_size: int = 64,
    text_padding: str | bool | None = None,
    return_predictions: bool = False,
) -> dict[str, Any]:
    """Zero-shot classification and image<->text retrieval of a dual encoder (stage 0, or any hub CLIP/SigLIP).

    Args:
        model: A ``CLIPModel``/``SiglipModel`` or the directory it was saved to (loaded with ``AutoModel``).
        processor: Its processor (``.image_processor`` and ``.tokenizer``); default: ``AutoProcessor`` from the
            model directory.
        caption_items: ``(image, caption)`` pairs for retrieval. Identical captions are merged into one text whose
            positives are all their images, so a caption shared by several images is not a retrieval error.
        class_items: ``(image, class)`` pairs for zero-shot classification; ``class`` is an index into
            ``class_names`` or a class name.
        class_names: The classes; each is turned into text with ``class_template`` (e.g. ``"a photo of a {}."``).
        class_template: Format string of a class prompt.
        batch_size: Images per forward pass.
        text_padding: Tokenizer padding override (see :func:`encode_texts`).
        return_predictions: Also return ``"zero_shot_predictions"``: the predicted class name of each of
            ``class_items``, in order (to see which images the encoder gets wrong).

    Returns:
        ``{"zero_shot_accuracy", "zero_shot_n"}`` when ``class_items`` are given, and ``{"i2t_r1", ..., "t2i_r10",
        "retrieval_n_images", "retrieval_n_texts"}`` when ``caption_items`` are.
    """
    from transformers import AutoModel, AutoProcessor

    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        model = AutoModel.from_pretrained(path)
        processor = processor or AutoProcessor.from_pretrained(path)
    if processor is None:
        raise ValueError("pass the processor when passing a model object")
    model.eval()
    tokenizer, image_processor = processor.tokenizer, processor.image_processor
    results: dict[str, Any] = {}
    if class_items:
        if not class_names:
            raise ValueError("class_items need class_names")
        index = {name: i for i, name in enumerate(class_names)}
        labels = []
        for i, (_, cls) in enumerate(class_items):
            if isinstance(cls, str):
                if cls not in index:
                    raise ValueError(f"class_items[{i}]: class {cls!r} is not in class_names")
                cls = index[cls]
            if not 0 <= int(cls) < len(class_names):
                raise ValueError(f"class_items[{i}]: class index {cls} out of range 0..{len(class_names) - 1}")
            labels.append(int(cls))
        image_embeds = encode_images(model, image_processor, [im for im, _ in class_items], batch_size)
        class_embeds = encode_texts(
            model, tokenizer, [class_template.format(c) for c in class_names], padding=text_padding
        )
        results["zero_shot_accuracy"] = zero_shot_accuracy(image_embeds, class_embeds, torch.tensor(labels))
        results["zero_shot_n"] = len(labels)
        if return_predictions:
            predicted = zero_shot_predictions(image_embeds, class_embeds).tolist()
            results["zero_shot_predictions"] = [class_names[k] for k in predicted]
    if caption_items:
        texts = list(dict.fromkeys(c for _, c in caption_items))  # unique captions, first-seen order
        text_index = {t: j for j, t in enumerate(texts)}
        positives = torch.zeros(len(caption_items), len(texts), dtype=torch.bool)
        for i, (_, c) in enumerate(caption_items):
            positives[i, text_index[c]] = True
        image_embeds = encode_images(model, image_processor, [im for im, _ in caption_items], batch_size)
        text_embeds = encode_texts(model, tokenizer, texts, padding=text_padding)
        results.update(retrieval_recall(image_embeds @ text_embeds.T, positives))  # [N_img, N_txt]
        results["retrieval_n_images"], results["retrieval_n_texts"] = len(caption_items), len(texts)
    return results
