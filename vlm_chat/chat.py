"""``VLMChat``: build, load, save and talk to a vision-language model."""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList, TextIteratorStreamer

from vlm_chat.atomic import atomic_directory, recover
from vlm_chat.card import model_card
from vlm_chat.config import FORMAT_VERSION, LMConfig, MapperConfig, VisionConfig, VLMConfig
from vlm_chat.generation import EventStop, build_generation_config
from vlm_chat.images import ImageLike, load_image
from vlm_chat.language import load_lm, load_tokenizer, resolve_dtype
from vlm_chat.mappers import build_mapper
from vlm_chat.model import VLMModel
from vlm_chat.prompting import Message, VLMProcessor
from vlm_chat.vision import VisionTower

logger = logging.getLogger(__name__)

CAPTION_PROMPTS = {
    False: "Describe the image in one short sentence.",
    True: "Describe the image in detail.",
}
_VISION_DIR, _ADAPTER_DIR, _LM_DIR, _MAPPER_FILE = "vision", "adapter", "lm", "mapper.safetensors"


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_local(name: str, base: Path) -> str:
    """A path relative to a checkpoint directory if it exists there, else the name as given (hub id / abs path)."""
    candidate = base / name
    return str(candidate) if name and candidate.is_dir() else name


class VLMChat:
    """A chat-ready VLM: model, processor and config.

    Build one with :meth:`from_components` (untrained) or :meth:`from_pretrained` (a saved directory).
    """

    def __init__(self, model: VLMModel, processor: VLMProcessor, config: VLMConfig, device: torch.device,
                 source_dir: Path | None = None):
        self.model = model
        self.processor = processor
        self.config = config
        self.device = device
        self._source_dir = source_dir  # where the vision tower came from, to copy it on save
        #: Held while the model generates: one generation at a time per model (the front ends share one instance).
        self.lock = threading.Lock()

    # ------------------------------------------------------------------------------------------------ building
    @classmethod
    def _build(cls, config: VLMConfig, base_dir: Path | None = None, device: str | torch.device | None = None,
               adapter_dir: Path | None = None, mapper_state: dict | None = None, is_trainable: bool = False,
               seed: int = 0) -> VLMChat:
        device = torch.device(device) if device is not None else _default_device()
        dtype = resolve_dtype(config.lm.dtype, device)
        vision_cfg = VisionConfig(**{**vars(config.vision)})
        lm_cfg = LMConfig(**{**vars(config.lm)})
        if base_dir is not None:
            vision_cfg.name_or_path = _resolve_local(config.vision.name_or_path, base_dir)
            lm_cfg.name_or_path = _resolve_local(config.lm.name_or_path, base_dir)
        tokenizer_src = str(base_dir) if base_dir is not None else lm_cfg.name_or_path
        from vlm_chat.offline import resolve_lm

        tokenizer = load_tokenizer(resolve_lm(tokenizer_src), config.image_token, lm_cfg.trust_remote_code)
        vision = VisionTower(vision_cfg, dtype=dtype, trust_remote_code=lm_cfg.trust_remote_code)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # a fresh LoRA adapter and mapper are the same for the same seed
            lm = load_lm(lm_cfg, tokenizer, dtype, adapter_dir=adapter_dir, is_trainable=is_trainable)
            d_lm = lm.get_input_embeddings().weight.shape[1]
            mapper = build_mapper(config.mapper, vision.hidden_size, d_lm, grid=vision.grid, num_inputs=vision.num_tokens)
        if mapper_state is not None:
            try:
                mapper.load_state_dict(mapper_state)
            except RuntimeError as e:
                raise ValueError(
                    f"{_MAPPER_FILE} does not fit the mapper described in config.json ({config.mapper}): {e}"
                ) from e
        mapper.to(dtype)
        n_vis = mapper.num_tokens(vision.num_tokens)
        if config.num_image_tokens and config.num_image_tokens != n_vis:
            raise ValueError(f"config says num_image_tokens={config.num_image_tokens} but the tower and mapper give {n_vis}")
        config.num_image_tokens = n_vis
        processor = VLMProcessor(
            tokenizer, vision.image_processor, config.image_token, n_vis, lm_cfg.max_length, config.system_prompt
        )
        model = VLMModel(vision, mapper, lm, processor.image_token_id)
        if not lm_cfg.load_in_4bit:  # bitsandbytes places 4-bit weights itself
            model.to(device)
        else:
            vision.to(device)
            mapper.to(device)
        model.eval()
        return cls(model, processor, config, device, source_dir=base_dir)

    @classmethod
    def from_components(cls, vision: str, lm: str, mapper: str = "mlp", *, feature_layer: int = -2,
                        mapper_config: dict[str, Any] | None = None, lm_config: dict[str, Any] | None = None,
                        device: str | torch.device | None = None, seed: int = 0,
                        system_prompt: str | None = None) -> VLMChat:
        """Assemble an untrained VLM from a vision tower and an LLM.

        Args:
            vision: Hub id or directory of a CLIP/SigLIP model.
            lm: Hub id, directory or offline alias of a causal LM with a chat template.
            mapper: ``mlp``, ``perceiver`` or ``qformer``.
            feature_layer: Hidden state of the tower to use (-2: second to last).
            mapper_config: Extra :class:`~vlm_chat.config.MapperConfig` fields (depth, pool, num_queries, ...).
            lm_config: Extra :class:`~vlm_chat.config.LMConfig` fields (lora_r, load_in_4bit, dtype, max_length, ...).
            device: ``cpu``/``cuda``; default: CUDA if available.
            seed: Seed of the mapper's initialisation.
            system_prompt: System turn of every conversation without one (training and chat); None: the chat
                template's own default.

        Returns:
            The model with a fresh mapper and a fresh LoRA adapter (a no-op at init).
        """
        from vlm_chat.config import from_dict

        config = VLMConfig(
            system_prompt=system_prompt,
            vision=VisionConfig(name_or_path=str(vision), feature_layer=feature_layer),
            mapper=from_dict(MapperConfig, {"kind": mapper, **(mapper_config or {})}, "mapper_config"),
            lm=from_dict(LMConfig, {"name_or_path": str(lm), **(lm_config or {})}, "lm_config"),
        )
        return cls._build(config, device=device, is_trainable=True, seed=seed)

    @classmethod
    def from_config(cls, config: VLMConfig, device: str | torch.device | None = None, seed: int = 0) -> VLMChat:
        """Assemble an untrained VLM from a :class:`VLMConfig` (as the training scripts do)."""
        return cls._build(config, device=device, is_trainable=True, seed=seed)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        is_trainable: bool = False) -> VLMChat:
        """Load a directory written by :meth:`save_pretrained`, a training run, or :meth:`export`.

        Args:
            path: The checkpoint directory.
            device: ``cpu``/``cuda``; default: CUDA if available.
            is_trainable: Load the LoRA adapter with gradients (to continue training).

        Raises:
            FileNotFoundError: the directory or one of its required files is missing (the message names it).
            ValueError: the config is from an incompatible version or inconsistent.
        """
        base = Path(path)
        recover(base)  # a save that died between its two renames left the previous version aside: bring it back
        if not base.is_dir():
            raise FileNotFoundError(f"checkpoint directory not found: {base}")
        config_path = base / "config.json"
        if not config_path.is_file():
            raise FileNotFoundError(f"{base} is not a vlm-chat checkpoint: {config_path.name} is missing")
        config = VLMConfig.load(config_path)
        required = [_MAPPER_FILE, "tokenizer_config.json", "tokenizer.json"]
        if config.lm.use_lora:
            required += [f"{_ADAPTER_DIR}/adapter_config.json", f"{_ADAPTER_DIR}/adapter_model.safetensors"]
        for part in (config.vision.name_or_path, config.lm.name_or_path):
            if part in (_VISION_DIR, _LM_DIR):  # a model stored inside the checkpoint
                required += [f"{part}/config.json", f"{part}/model.safetensors"]
        if config.vision.name_or_path == _VISION_DIR:
            required.append(f"{_VISION_DIR}/preprocessor_config.json")
        for rel in required:
            if not (base / rel).is_file():
                raise FileNotFoundError(f"checkpoint {base} is missing {rel}")
        for rel in required:  # a truncated or corrupt weights file: name it, rather than a safetensors traceback
            if rel.endswith(".safetensors"):
                try:
                    with safe_open(str(base / rel), framework="pt"):
                        pass
                except Exception as e:
                    raise ValueError(f"checkpoint {base}: {rel} is not a readable safetensors file ({e})") from e
        mapper_state = load_file(str(base / _MAPPER_FILE))
        adapter = base / _ADAPTER_DIR if config.lm.use_lora else None
        chat = cls._build(config, base_dir=base, device=device, adapter_dir=adapter, mapper_state=mapper_state,
                          is_trainable=is_trainable)
        if is_trainable:
            chat.model.configure_trainable(mapper=True, lora=config.lm.use_lora)
        return chat

    # ------------------------------------------------------------------------------------------------ saving
    def save_pretrained(self, path: str | os.PathLike, card: str | None = None) -> None:
        """Write the checkpoint directory atomically (a crash mid-save leaves any previous one intact).

        Args:
            path: Target directory (replaced if it exists).
            card: Model card text (``README.md``); a default one is written if not given.
        """
        self._write(Path(path), merge=False, card=card)

    def export(self, path: str | os.PathLike, format: str = "merged", card: str | None = None,
               **check: Any) -> dict[str, Any] | None:
        """Write a standalone copy of the model with the LoRA adapter merged.

        Args:
            path: Target directory (written atomically: replaced only when complete, and for ``llava`` only when the
                check passes).
            format: ``merged`` (default): a vlm-chat checkpoint holding a full copy of the LLM, loaded with
                :meth:`from_pretrained`. ``llava``: a transformers ``LlavaForConditionalGeneration`` checkpoint that
                ``AutoModelForImageTextToText`` / ``AutoProcessor`` load without vlm-chat, reloaded and compared with
                this model on probe inputs before it is published (see :mod:`vlm_chat.export`).
            card: Model card text (``README.md``); a default one is written if not given.
            **check: ``llava`` only: ``probes`` and ``max_new_tokens`` of :func:`vlm_chat.export.verify_llava_export`.

        Returns:
            ``llava``: the check's report (probes, greedy_equal, max_logit_diff, seconds, ...); ``merged``: None.

        Raises:
            ValueError: unknown format, or a model Llava cannot express (the message says why and what to do).
            vlm_chat.export.ExportCheckError: the Llava export does not answer as this model (nothing is written).
        """
        from vlm_chat.export import FORMATS, export_llava

        if format not in FORMATS:
            raise ValueError(f"unknown export format {format!r}; valid formats: {', '.join(FORMATS)}")
        if self._source_dir is not None and Path(path).resolve() == Path(self._source_dir).resolve():
            raise ValueError(f"export target {path} is the checkpoint this model was loaded from; choose another "
                             "directory (the export would replace the checkpoint)")
        if format == "llava":
            return export_llava(self, path, card=card, **check)
        if check:
            raise TypeError(f"export(format='merged') takes no check options, got {', '.join(sorted(check))}")
        self._write(Path(path), merge=True, card=card)
        return None

    def push_to_hub(self, repo_id: str, format: str = "checkpoint", *, private: bool | None = None,
                    token: str | None = None, commit_message: str | None = None, card: str | None = None):
        """Upload this model to the Hugging Face Hub, as a checkpoint or an export.

        The directory is written to a temporary folder (as :meth:`save_pretrained` / :meth:`export` write it) and
        uploaded with ``huggingface_hub``; offline (``HF_HUB_OFFLINE``) the call fails before anything is written.

        Args:
            repo_id: ``owner/name`` of the model repo (created if missing).
            format: ``checkpoint`` (vlm-chat's own directory), ``merged`` or ``llava`` (see :meth:`export`).
            private: Visibility of a newly created repo (None: the account's default).
            token: Hub token (None: the logged-in one).
            commit_message: Message of the upload commit.
            card: Model card text; default: the format's own card.

        Returns:
            huggingface_hub's ``CommitInfo`` of the upload.

        Raises:
            ConnectionError: the Hub is off (``HF_HUB_OFFLINE``); nothing was written or uploaded.
            ValueError: bad ``repo_id`` or ``format``.
        """
        from vlm_chat.export import push_to_hub

        return push_to_hub(self, repo_id, format, private=private, token=token, commit_message=commit_message,
                           card=card)

    def _write(self, path: Path, merge: bool, card: str | None) -> None:
        with atomic_directory(path) as tmp:
            config = VLMConfig.from_dict(self.config.to_dict())
            config.format_version = FORMAT_VERSION
            mapper_state = {k: v.detach().contiguous().cpu() for k, v in self.model.mapper.state_dict().items()}
            save_file(mapper_state, str(tmp / _MAPPER_FILE))
            self.processor.tokenizer.save_pretrained(tmp)
            self.processor.image_processor.save_pretrained(tmp)
            self._save_vision(tmp / _VISION_DIR, config)
            lm = self.model.lm
            if merge:
                if config.lm.load_in_4bit:
                    raise ValueError("export merges LoRA into full-precision weights; load the model without 4-bit")
                # A copy: merging in place would leave this instance without its adapter.
                merged = copy.deepcopy(lm)
                merged = merged.merge_and_unload() if hasattr(merged, "merge_and_unload") else merged
                merged.save_pretrained(tmp / _LM_DIR)
                self.processor.tokenizer.save_pretrained(tmp / _LM_DIR)
                config.lm.name_or_path, config.lm.use_lora = _LM_DIR, False
            elif hasattr(lm, "save_pretrained") and config.lm.use_lora:
                # The image token's embedding rows are zeros rebuilt at load time, so no embedding layer is saved.
                # Only the trained adapter: DPO holds a frozen reference copy under another name.
                lm.save_pretrained(tmp / _ADAPTER_DIR, save_embedding_layers=False, selected_adapters=["default"])
            config.save(tmp / "config.json")
            card_config = config
            if merge:  # the card names the LLM the merged copy came from, not the "lm" directory it now is
                card_config = copy.deepcopy(config)
                card_config.lm = copy.deepcopy(self.config.lm)
            (tmp / "README.md").write_text(card or model_card(card_config, "merged" if merge else "checkpoint"))
        logger.info("saved %s to %s", "merged model" if merge else "checkpoint", path)

    def _save_vision(self, target: Path, config: VLMConfig) -> None:
        """Save a local (e.g. self-trained) vision tower inside the checkpoint; a hub id stays a reference."""
        name = self.config.vision.name_or_path
        local = Path(name).is_dir() or (self._source_dir is not None and (self._source_dir / name).is_dir())
        if not local:
            return
        self.model.vision.model.save_pretrained(target)
        self.model.vision.image_processor.save_pretrained(target)
        config.vision.name_or_path = _VISION_DIR

    # ------------------------------------------------------------------------------------------------ inference
    def _inputs(self, images: list[ImageLike | None], prompts: list[str],
                histories: list[list[Message] | None], reserve: int) -> dict[str, torch.Tensor]:
        encoded, pil = [], []
        for image, prompt, history in zip(images, prompts, histories):
            if not isinstance(prompt, str):
                raise TypeError(f"prompt must be a string, got {type(prompt).__name__}")
            if not prompt.strip():
                raise ValueError("prompt is empty; ask a question (use caption() for a prompt-less description)")
            if image is not None:
                pil.append(load_image(image))
            encoded.append(self.processor.encode_prompt(prompt, history, has_image=image is not None, reserve=reserve))
        batch = self.processor.pad(encoded, padding_side="left")
        batch = {k: v.to(self.device) for k, v in batch.items()}
        if pil:
            batch["pixel_values"] = self.processor.pixel_values(pil).to(self.device)
        return batch

    def generation_config(self, kwargs: dict[str, Any]) -> GenerationConfig:
        """The ``GenerationConfig`` that ``generate`` uses for these keywords (greedy, this model's stop tokens, the
        image token suppressed); unknown keywords and out-of-range values are errors naming them."""
        return build_generation_config(self.processor, kwargs)

    @torch.inference_mode()
    def _generate_ids(self, batch: dict[str, torch.Tensor], gen: GenerationConfig, streamer=None,
                      stopping_criteria: list[StoppingCriteria] | None = None) -> torch.Tensor:
        embeds = self.model.embed(batch["input_ids"], batch.get("pixel_values"))
        return self.model.lm.generate(
            inputs_embeds=embeds, attention_mask=batch["attention_mask"], generation_config=gen, streamer=streamer,
            stopping_criteria=StoppingCriteriaList(stopping_criteria or []),
        )

    def generate_tokens(self, batch: dict[str, torch.Tensor], stopping_criteria: list[StoppingCriteria] | None = None,
                        seed: int | None = None, **generate_kwargs: Any) -> torch.Tensor:
        """Generate from prompts already encoded (``processor.encode_prompt``) and left-padded (``processor.pad``).

        The API server's batcher uses this to count tokens and to stop rows one by one; `generate_batch` is the
        text-level equivalent.

        Args:
            batch: ``input_ids`` / ``attention_mask`` ``[B, T]`` (left-padded) and, for image prompts,
                ``pixel_values`` ``[B, 3, H, W]``; on any device.
            stopping_criteria: transformers criteria; one returning a per-row ``[B]`` bool tensor ends rows early
                (those rows are padded with the pad token from then on).
            seed: Seed of the sampling RNG for this call (the global RNG state is left as it was).
            **generate_kwargs: As in :meth:`generate`.

        Returns:
            ``[B, T_new]`` the new token ids only.
        """
        gen = self.generation_config(generate_kwargs)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        with self.lock:
            if seed is None:
                return self._generate_ids(batch, gen, stopping_criteria=stopping_criteria)
            devices = [self.device] if self.device.type == "cuda" else []
            with torch.random.fork_rng(devices=devices):
                torch.manual_seed(seed)
                return self._generate_ids(batch, gen, stopping_criteria=stopping_criteria)

    def generate(self, image: ImageLike | None, prompt: str, history: list[Message] | None = None,
                 **generate_kwargs: Any) -> str:
        """Answer ``prompt`` about ``image``.

        Args:
            image: PIL image, path, bytes or numpy array; ``None`` for a text-only turn.
            prompt: The user's message. A literal ``<image>`` marks where the image goes.
            history: Earlier turns, ``[{"role": "user"|"assistant", "content": str}, ...]``.
            **generate_kwargs: transformers generation keywords (``max_new_tokens``, ``do_sample``, ``temperature``,
                ``top_p``, ``num_beams``, ...). Default: greedy, 64 new tokens.

        Returns:
            The answer text.
        """
        return self.generate_batch([image], [prompt], [history], **generate_kwargs)[0]

    def generate_batch(self, images: list[ImageLike | None], prompts: list[str],
                       histories: list[list[Message] | None] | None = None, **generate_kwargs: Any) -> list[str]:
        """Answer several prompts in one left-padded batch (same text as one at a time, greedy).

        Args:
            images: One image (or None) per prompt; either all images or all None.
            prompts: The questions.
            histories: Optional earlier turns per prompt.
            **generate_kwargs: As in :meth:`generate`.
        """
        if len(images) != len(prompts):
            raise ValueError(f"got {len(images)} images for {len(prompts)} prompts")
        if len({img is None for img in images}) > 1:
            raise ValueError("a batch must be all images or all text-only; split it")
        histories = histories or [None] * len(prompts)
        gen = self.generation_config(generate_kwargs)
        with self.lock:
            batch = self._inputs(images, prompts, histories, reserve=gen.max_new_tokens)
            out = self._generate_ids(batch, gen)
        return [t.strip() for t in self.processor.tokenizer.batch_decode(out, skip_special_tokens=True)]

    def stream(self, image: ImageLike | None, prompt: str, history: list[Message] | None = None, *,
               stop_event: threading.Event | None = None, **generate_kwargs: Any) -> Iterator[str]:
        """Like :meth:`generate`, yielding text pieces as they are decoded.

        Generation stops at the next token, and the model is free for the next caller, when the consumer closes the
        generator (``close()``, or dropping it: a web client that went away) or when ``stop_event`` is set.

        Args:
            image: As in :meth:`generate`.
            prompt: As in :meth:`generate`.
            history: As in :meth:`generate`.
            stop_event: Set it from any thread to end the generation early (the pieces so far stay valid).
            **generate_kwargs: As in :meth:`generate`.

        Yields:
            Text deltas; their concatenation is the answer (leading whitespace dropped).
        """
        gen = self.generation_config(generate_kwargs)
        batch = self._inputs([image], [prompt], [history], reserve=gen.max_new_tokens)
        streamer = TextIteratorStreamer(self.processor.tokenizer, skip_prompt=True, skip_special_tokens=True,
                                        timeout=600)
        errors: list[BaseException] = []
        closed = threading.Event()  # set when the consumer leaves; checked after every token

        def work():
            try:
                with self.lock:
                    self._generate_ids(batch, gen, streamer, stopping_criteria=[EventStop(closed, stop_event)])
            except BaseException as e:  # surface the error in the caller's thread, not a dead worker
                errors.append(e)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            started = False
            for piece in streamer:
                if not started:
                    piece = piece.lstrip()
                    started = bool(piece)
                if piece:
                    yield piece
        finally:
            # Normal end, an error, or GeneratorExit from close(): the worker stops at its next token, and joining it
            # here means the lock is free when close() returns, so the next request never waits for an abandoned one.
            closed.set()
            thread.join()
        if errors:
            raise errors[0]

    def caption(self, image: ImageLike, detailed: bool = False, **generate_kwargs: Any) -> str:
        """A short (or detailed) description of ``image``."""
        if image is None:
            raise ValueError("caption() needs an image")
        return self.generate(image, CAPTION_PROMPTS[bool(detailed)], **generate_kwargs)

    def to(self, device: str | torch.device) -> VLMChat:
        self.device = torch.device(device)
        with contextlib.suppress(Exception):
            self.model.to(self.device)
        return self
