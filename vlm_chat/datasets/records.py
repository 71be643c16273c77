"""Writing datasets in the project's on-disk formats, for any source (the shapes world and easy-VQA use it).

On-disk formats (DESIGN.md "Data formats"), written by :func:`write_records` for any source (easy-VQA uses it too);
all image paths are relative to the output directory, which is also the image folder:

- ``images/<id>.png``
- ``conversations.json``: LLaVA ``[{"id", "image", "conversations": [{"from": "human", "value": "<image>\\nQ"},
  {"from": "gpt", "value": "A"}, ...]}]``
- ``captions.jsonl``: ``{"image", "caption"}``
- ``preferences.jsonl``: ``{"image", "prompt", "chosen", "rejected"}``
- ``pope.jsonl``: ``{"image", "question", "label", "category", "object"}``
- ``vqa.jsonl``: ``{"image", "question", "answer", "answer_type"}`` (single-answer questions, for evaluation)
- ``manifest.json``: which files were written and how many rows each holds.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

logger = logging.getLogger(__name__)


@dataclass
class ImageRecord:
    """Everything one dataset says about one image, in the shapes of the on-disk formats.

    Attributes:
        image_id: File stem of the image in the image folder (unique within a dataset).
        image: A ``PIL.Image`` to save as PNG, or the path of an existing PNG to copy.
        conversations: Conversations in transformers' chat form (each a list of ``{"role", "content"}``; the first
            user turn starts with ``"<image>\\n"``); one LLaVA row each.
        captions: Captions; one caption row each.
        preferences: ``{"prompt", "chosen", "rejected"}`` dicts (other keys are not written).
        pope: ``{"question", "label", "category", "object"}`` dicts.
        vqa: ``{"question", "answer", "answer_type"}`` dicts.
    """

    image_id: str
    image: Image.Image | str | os.PathLike
    conversations: list[list[dict[str, str]]] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    preferences: list[dict[str, str]] = field(default_factory=list)
    pope: list[dict[str, str]] = field(default_factory=list)
    vqa: list[dict[str, str]] = field(default_factory=list)


def messages_to_llava(messages: Sequence[dict[str, str]]) -> list[dict[str, str]]:
    """transformers chat messages -> LLaVA ``[{"from": "human"|"gpt", "value"}]`` turns."""
    roles = {"user": "human", "assistant": "gpt"}
    turns = []
    for i, m in enumerate(messages):
        if m.get("role") not in roles:
            raise ValueError(f"messages[{i}]: role must be 'user' or 'assistant', got {m.get('role')!r}")
        turns.append({"from": roles[m["role"]], "value": m["content"]})
    return turns


def _write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_records(
    out_dir: str | os.PathLike, records: Iterable[ImageRecord], image_folder: str = "images"
) -> dict[str, int]:
    """Write images and every non-empty annotation file of ``records`` to ``out_dir``.

    Args:
        out_dir: Output directory (created). It is the image folder of every file written: image paths in the rows
            are relative to it, which is what ``vlm_chat.data`` readers assume by default.
        records: The images and their annotations.
        image_folder: Sub-folder of ``out_dir`` for the PNGs.

    Returns:
        Rows written per file name (``{"images": n, "conversations.json": n, ...}``), also saved as ``manifest.json``.
    """
    out = Path(out_dir)
    (out / image_folder).mkdir(parents=True, exist_ok=True)
    llava, captions, prefs, pope, vqa = [], [], [], [], []
    seen: set[str] = set()
    for rec in records:
        if rec.image_id in seen:
            raise ValueError(f"duplicate image_id {rec.image_id!r}: each record needs its own image file")
        seen.add(rec.image_id)
        rel = f"{image_folder}/{rec.image_id}.png"
        if isinstance(rec.image, Image.Image):
            # compress_level fixed so the bytes do not depend on PIL's default
            rec.image.save(out / rel, format="PNG", compress_level=6)
        else:
            src = Path(rec.image)
            if src.suffix.lower() != ".png":
                raise ValueError(f"record {rec.image_id!r}: image {src} is not a PNG; pass a PIL image to convert it")
            shutil.copyfile(src, out / rel)
        for k, messages in enumerate(rec.conversations):
            row_id = rec.image_id if len(rec.conversations) == 1 else f"{rec.image_id}_{k}"
            llava.append({"id": row_id, "image": rel, "conversations": messages_to_llava(messages)})
        captions += [{"image": rel, "caption": c} for c in rec.captions]
        prefs += [{"image": rel, **{k: p[k] for k in ("prompt", "chosen", "rejected")}} for p in rec.preferences]
        pope += [{"image": rel, **{k: p[k] for k in ("question", "label", "category", "object")}} for p in rec.pope]
        vqa += [{"image": rel, **{k: q[k] for k in ("question", "answer", "answer_type")}} for q in rec.vqa]

    counts = {"images": len(seen)}
    if llava:
        with open(out / "conversations.json", "w", encoding="utf-8") as f:
            json.dump(llava, f, ensure_ascii=False, indent=1)
        counts["conversations.json"] = len(llava)
    for name, rows in (
        ("captions.jsonl", captions),
        ("preferences.jsonl", prefs),
        ("pope.jsonl", pope),
        ("vqa.jsonl", vqa),
    ):
        if rows:
            counts[name] = _write_jsonl(out / name, rows)
    with open(out / "manifest.json", "w", encoding="utf-8") as f:
        json.dump({"image_folder": image_folder, "files": counts}, f, indent=1)
    logger.info("wrote %s to %s", ", ".join(f"{k}={v}" for k, v in counts.items()), out)
    return counts
