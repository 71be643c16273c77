"""Stage-0 encoder metrics: zero-shot classification and image-text retrieval of a CLIP/SigLIP dual encoder."""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Any

import torch

logger = logging.getLogger(__name__)

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
