"""Rows -> training batches: the chat template's tokens and masks, and the images as pixels or frozen-tower features.

Where the vision tower runs, by ``cache_vision_features``:

* off: the collate function only decodes and preprocesses images (``pixel_values``, CPU work that DataLoader workers
  may share); the tower runs in the training step, inside the model's forward, on the training device;
* on: :meth:`FeatureCache.precompute` runs the tower once per distinct image of the samples the run will draw, in one
  pass *before* training, and the collate function looks the features up (``image_features``). After that pass the
  table is read-only, so the tower never runs inside a DataLoader worker (no CUDA in forked processes, no cache per
  worker); a batch with an image outside the table (one prefetched past the last step) carries pixels instead.

A batch holds each image once. DPO batches hold ``2B`` sequences (the ``B`` chosen answers, then the ``B`` rejected
ones) for ``B`` images; the DPO step pairs each image with both (:func:`vlm_chat.training.stages.dpo_step`).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from tqdm.auto import tqdm

from vlm_chat.images import load_image

logger = logging.getLogger(__name__)

__all__ = ["Collator", "FeatureCache"]


class FeatureCache:
    """Images of a batch as model inputs: ``pixel_values`` (``enabled=False``) or cached tower features.

    Args:
        chat: the :class:`~vlm_chat.chat.VLMChat` being trained (its processor and vision tower).
        enabled: cache frozen-tower features per image path instead of returning pixels.
    """

    def __init__(self, chat, enabled: bool):
        self.enabled = enabled
        self.processor = chat.processor
        self.store: dict[str, torch.Tensor] = {}
        self._chat = chat  # dropped by precompute(): the table is then read-only

    def _pixels(self, paths: list[str]) -> torch.Tensor:
        return self.processor.pixel_values([load_image(p) for p in paths])  # [n, 3, H, W]

    def _fill(self, paths: list[str]) -> None:
        chat = self._chat
        with torch.no_grad():
            feats = chat.model.vision(self._pixels(paths).to(chat.device))  # [n, N_patch, d_vis]
        for path, f in zip(paths, feats):
            self.store[path] = f.cpu()

    def precompute(self, paths: list[str], batch_size: int = 64, progress: bool = True) -> int:
        """Run the tower once on every distinct image of ``paths``; afterwards the table is read-only.

        Args:
            paths: image paths of the training rows (repeats are fine).
            batch_size: images per tower forward pass.
            progress: show a progress bar.

        Returns:
            The number of images in the table.
        """
        if not self.enabled:
            raise ValueError("precompute() needs a FeatureCache with enabled=True")
        todo = [p for p in dict.fromkeys(paths) if p not in self.store]
        if self._chat is None and todo:
            raise RuntimeError(f"this feature table is read-only; {len(todo)} images are missing")
        quiet = True if not progress or not todo else None  # None: tqdm draws the bar on a terminal only
        for start in tqdm(range(0, len(todo), batch_size), desc="vision features", disable=quiet):
            self._fill(todo[start : start + batch_size])
        self._chat = None
        logger.info("vision features of %d images computed before training", len(self.store))
        return len(self.store)

    def __call__(self, paths: list[str]) -> dict[str, torch.Tensor]:
        if not self.enabled:
            return {"pixel_values": self._pixels(paths)}  # the tower runs in the training step
        missing = [p for p in dict.fromkeys(paths) if p not in self.store]
        if missing:
            if self._chat is None:
                # Not in the table (e.g. a batch prefetched past the last step): pixels, and the tower runs in the
                # training step as with the cache off. Never the tower here: this may be a DataLoader worker.
                return {"pixel_values": self._pixels(paths)}
            self._fill(missing)  # outside training (benchmarks, tests): compute on first use
        return {"image_features": torch.stack([self.store[p] for p in paths])}  # [B, N_patch, d_vis]

    def __getstate__(self) -> dict[str, Any]:
        # A DataLoader worker started with "spawn" receives the table and the processor, never the model.
        return {**self.__dict__, "_chat": None}


class Collator:
    """Raw rows -> padded tensors (right padding) with labels on assistant tokens only.

    Args:
        chat: the :class:`~vlm_chat.chat.VLMChat` being trained (only its processor is kept).
        stage: a stage name or :class:`~vlm_chat.training.stages.Stage`; it says how a row becomes conversations.
        features: what the images become (:class:`FeatureCache`).
        independent_turns: conversation stages: train each QA pair as if asked alone about the image.
    """

    def __init__(self, chat, stage, features: FeatureCache, independent_turns: bool = False):
        from vlm_chat.training.stages import STAGES

        self.stage = STAGES[stage] if isinstance(stage, str) else stage
        self.processor = chat.processor
        self.features = features
        self.independent_turns = independent_turns and self.stage.reads == "conversations"

    def _encode(self, messages: list[dict], image: str | None):
        proc = self.processor
        encode = proc.encode_independent_turns if self.independent_turns else proc.encode_conversation
        return encode(messages, num_images=int(image is not None))

    def __call__(self, rows: list[dict]) -> dict[str, Any]:
        kept, images = [], []
        for row in rows:
            encoded = [self._encode(m, row["image"]) for m in self.stage.conversations(row, self.processor.image_token)]
            if any(e is None for e in encoded):  # truncation would cut visual tokens or leaves nothing to learn
                continue
            kept.append(encoded)
            images.append(row["image"])
        if not kept:
            raise ValueError("every sample of a batch was skipped (too long for max_length?); raise max_length")
        # One column per conversation of a row: [B] sequences, or for DPO [2B] = the chosen ones, then the rejected.
        batch = self.processor.pad([e for column in zip(*kept) for e in column], "right")
        with_image = [p for p in images if p is not None]
        if with_image:
            if len(with_image) != len(images):
                raise ValueError("a batch mixes samples with and without images; not supported yet")
            batch.update(self.features(with_image))  # one entry per image: [B, ...]
        return batch
