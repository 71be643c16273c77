"""Nothing unpickles or runs downloaded code: a static scan of the package, and loading, saving, chatting and planted
payloads checked at run time."""

from __future__ import annotations

import ast
import json
import pickle
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reliability.inputs import QUESTION, REPO, damaged_copy
from vlm_chat import VLMChat

# Unsafe deserialisation and code execution, as they would be written in this code base.
_BANNED_MODULES = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "marshal", "shelve"}


def unsafe_calls(source: str, filename: str = "<string>") -> list[str]:
    """Places in ``source`` that could read a pickle or run downloaded code.

    Flags: importing a pickle-family module; ``torch.load`` without ``weights_only=True``; ``weights_only=False``;
    ``np.load(allow_pickle=True)``; ``use_safetensors=False``; a literal ``trust_remote_code=True``.
    """
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{where}: import {n}" for n in names if n.split(".")[0] in _BANNED_MODULES]
        if not isinstance(node, ast.Call):
            continue
        func = ast.unparse(node.func)
        kw = {k.arg: k.value for k in node.keywords if k.arg}
        if func.endswith(("torch.load", "serialization.load")):
            flag = kw.get("weights_only")
            if not (isinstance(flag, ast.Constant) and flag.value is True):
                found.append(f"{where}: {func}() without weights_only=True")
        for name, bad in (
            ("weights_only", False),
            ("allow_pickle", True),
            ("use_safetensors", False),
            ("trust_remote_code", True),
        ):
            value = kw.get(name)
            if isinstance(value, ast.Constant) and value.value is bad:
                found.append(f"{where}: {func}({name}={bad})")
    return found


def test_unsafe_call_scanner_catches_what_it_should():
    bad = (
        "import torch, pickle\nfrom dill import loads\nimport numpy as np\n"
        "torch.load('x.bin')\ntorch.load('x.bin', weights_only=False)\nnp.load('a.npy', allow_pickle=True)\n"
        "AutoModel.from_pretrained(p, trust_remote_code=True, use_safetensors=False)\n"
    )
    assert len(unsafe_calls(bad)) == 8  # torch.load(..., weights_only=False) is flagged twice
    assert (
        unsafe_calls("import torch\ntorch.load('x', weights_only=True)\nA.from_pretrained(p, trust_remote_code=flag)")
        == []
    )


def test_no_unguarded_pickle_or_remote_code_in_the_package():
    """Fails as soon as someone adds an unguarded torch.load, a pickle import, or hard-codes trust_remote_code=True."""
    sources = sorted((REPO / "vlm_chat").rglob("*.py")) + sorted((REPO / "train").glob("*.py")) + [REPO / "app.py"]
    found = [hit for path in sources for hit in unsafe_calls(path.read_text(), str(path.relative_to(REPO)))]
    assert found == []


def test_loading_saving_and_chatting_read_no_pickle(ckpt, tmp_path, monkeypatch, refs):
    """from_pretrained, generate, save_pretrained, export and reloading the export never unpickle anything."""

    def refuse(*args, **kwargs):
        raise AssertionError("a pickle was read")

    class RefusingUnpickler(pickle.Unpickler):
        def __init__(self, *args, **kwargs):
            refuse()

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", RefusingUnpickler)
    loaded = VLMChat.from_pretrained(ckpt, device="cpu")
    loaded.generate(refs["scene"], QUESTION, max_new_tokens=2)
    loaded.save_pretrained(tmp_path / "again")
    loaded.export(tmp_path / "merged")
    VLMChat.from_pretrained(tmp_path / "merged", device="cpu").generate(refs["scene"], QUESTION, max_new_tokens=2)
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert written and not [p for p in written if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]


class _Payload:
    """Unpickling this runs ``open(marker, "w")``: the shape of every pickle exploit."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_planted_malicious_pickle_never_runs(ckpt, tmp_path, tiny_clip_dir, tiny_llama_dir, monkeypatch):
    """A live exploit planted as a checkpoint's or an LLM's only weights is refused by our loader, naming the missing
    safetensors file, before anything unpickles it (torch.load with weights_only=True would refuse this payload too, so
    the check is that no unpickling is attempted at all, not merely that it fails)."""
    marker = tmp_path / "pwned"
    payload = {"vision_model.embeddings.patch_embedding.weight": _Payload(marker)}
    torch.save(payload, tmp_path / "probe.bin")
    torch.load(tmp_path / "probe.bin", weights_only=False)  # the payload is live: unpickled unsafely, it runs
    assert marker.exists()
    marker.unlink()

    def plant(d: Path):
        (d / "vision/model.safetensors").unlink()
        torch.save(payload, d / "vision/pytorch_model.bin")

    damaged = damaged_copy(ckpt, tmp_path, plant)
    lm = tmp_path / "lm"
    shutil.copytree(tiny_llama_dir, lm)
    (lm / "model.safetensors").unlink()
    torch.save(payload, lm / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    monkeypatch.setattr(pickle, "load", lambda *a, **k: pytest.fail("pickle.load was called"))
    with pytest.raises(FileNotFoundError, match="missing vision/model.safetensors"):
        VLMChat.from_pretrained(damaged, device="cpu")
    with pytest.raises(OSError, match="model.safetensors"):
        VLMChat.from_components(str(tiny_clip_dir), str(lm), device="cpu")
    assert not marker.exists()


def _to_bin(weights: Path) -> None:
    """Replace a safetensors file by the same tensors as a (harmless) pytorch_model.bin pickle."""
    torch.save(load_file(str(weights)), weights.with_name("pytorch_model.bin"))
    weights.unlink()


def test_weights_that_are_not_safetensors_are_refused_unread(
    ckpt, tmp_path, tiny_clip_dir, tiny_llama_dir, monkeypatch
):
    """Only safetensors are read: weights present only as pytorch_model.bin are refused without calling torch.load
    (they used to be read with torch.load(weights_only=True): no code execution, but a pickle all the same)."""
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    damaged = damaged_copy(ckpt, tmp_path, lambda d: _to_bin(d / "vision/model.safetensors"))
    with pytest.raises(FileNotFoundError, match="missing vision/model.safetensors"):
        VLMChat.from_pretrained(damaged, device="cpu")
    for name, source in (("vision_bin", tiny_clip_dir), ("lm_bin", tiny_llama_dir)):
        shutil.copytree(source, tmp_path / name)
        _to_bin(tmp_path / name / "model.safetensors")
    with pytest.raises(OSError, match="model.safetensors"):
        VLMChat.from_components(str(tmp_path / "vision_bin"), str(tiny_llama_dir), device="cpu")
    with pytest.raises(OSError, match="model.safetensors"):
        VLMChat.from_components(str(tiny_clip_dir), str(tmp_path / "lm_bin"), device="cpu")


def test_trust_remote_code_is_off_unless_asked(tmp_path, tiny_clip_dir, tiny_llama_dir, monkeypatch):
    """A checkpoint that ships code (``auto_map``) is loaded with the built-in classes; its code never runs."""
    import transformers.dynamic_module_utils as dynamic

    marker = tmp_path / "remote_code_ran"
    code = f"open({str(marker)!r}, 'w').close()\nclass Evil: pass\n"
    lm, vision = tmp_path / "lm", tmp_path / "vision"
    shutil.copytree(tiny_llama_dir, lm)
    shutil.copytree(tiny_clip_dir, vision)
    for d, files_and_maps in (
        (
            lm,
            {
                "config.json": {"AutoConfig": "evil.Evil", "AutoModelForCausalLM": "evil.Evil"},
                "tokenizer_config.json": {"AutoTokenizer": ["evil.Evil", None]},
            },
        ),
        (
            vision,
            {
                "config.json": {"AutoConfig": "evil.Evil"},
                "preprocessor_config.json": {"AutoImageProcessor": "evil.Evil"},
            },
        ),
    ):
        (d / "evil.py").write_text(code)
        for name, auto_map in files_and_maps.items():
            cfg = json.loads((d / name).read_text())
            cfg["auto_map"] = auto_map
            (d / name).write_text(json.dumps(cfg))
    calls = []
    original = dynamic.get_class_from_dynamic_module
    for module in list(sys.modules.values()):  # every auto class imported the loader by name
        if getattr(module, "get_class_from_dynamic_module", None) is original:
            monkeypatch.setattr(
                module, "get_class_from_dynamic_module", lambda *a, **k: calls.append(a) or original(*a, **k)
            )
    built = VLMChat.from_components(str(vision), str(lm), device="cpu")
    assert built.config.lm.trust_remote_code is False
    assert built.generate(None, "Hi", max_new_tokens=2) is not None
    assert calls == [] and not marker.exists()

