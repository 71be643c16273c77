"""Where is shapes-world scene information lost? Linear probes on the tower and the mapper, and the LLM's answers.

    python -m bench.probe_scenes [--model DIR] [--train-scenes 1500] [--test-scenes 400] [--llm-scenes 100] [--output F]
    python -m bench.probe_scenes --vision runs/probe/clip/final   # a stage-0 tower alone: no mapper, no LLM
    python -m bench.probe_scenes --vision DIR --pool 2 --stages layer-2 avg2x2 pooled   # + 2x2-averaged patches

Probe-training scenes come from the shapes world's training seed (1), probe-test scenes from its validation seed (2);
the test seed (1234) is refused. Every image goes through the model's own path: ``VLMChat.processor.pixel_values`` ->
``model.vision`` (the configured feature layer, exactly what the mapper receives) -> ``model.mapper``. The other
layers are the same forward pass's ``hidden_states``; ``pooled`` is the tower's pooled output (CLIP: the
post-layer-norm CLS token).

Targets, per stage (each a multinomial logistic regression fitted in torch with L-BFGS on z-scored features; its L2
weight is chosen on a fifth of the probe-training scenes, then refitted on all of them):

- per quadrant (the scene cell a "Where is ...?" answer names; 4x4 of the 8x8 patches at 64 px), one probe each:
  ``empty`` (is an object there; all quadrants), and ``color``, ``shape``, ``size`` of the object there (occupied
  quadrants only); ``object`` = colour and shape both right (what naming or locating an object needs);
- ``count`` (1-4 objects) from all patches;
- ``where``: from one patch token of an occupied quadrant, which quadrant it lies in (does a token's content say
  where it is? An LLM reads a token by its content: if it does not, only the token order tells the place).

Stages whose tokens are not one per patch (pooled output; a pooling or resampling mapper) are probed on all tokens.
The LLM row asks every ``shapes.qa_pairs`` question of the first ``--llm-scenes`` probe-test scenes with
``VLMChat.generate_batch`` (greedy); a reply is right when the first answer of that question type's vocabulary in it
(``vlm_chat.eval.extract_answer``) is the answer. See docs/experiments/2026-12-04-where-scene-information-is-lost.md
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger("bench.probe_scenes")

TRAIN_SEED, VALIDATION_SEED, TEST_SEED = 1, 2, 1234  # the shapes world's conventions (vlm_chat.datasets.shapes)
QUADRANT_TARGETS = ("empty", "color", "shape", "size")
TARGETS = (*QUADRANT_TARGETS, "object", "count", "where")
WEIGHT_DECAYS = (1e-4, 1e-3, 1e-2, 1e-1)


def answer_vocabularies() -> dict[str, list[str]]:
    """The answers each ``shapes.qa_pairs`` question type can have; a reply is judged by the first one it names.
    Counts allow 0-9 so that a reply of "5" is read as the (wrong) answer 5 rather than as no answer."""
    from vlm_chat.datasets import shapes

    numbers, yes_no = [str(k) for k in range(10)], ["yes", "no"]
    return {"count": numbers, "count_attribute": numbers, "color": list(shapes.COLORS), "shape": list(shapes.SHAPES),
            "size": list(shapes.SIZES), "position": list(shapes.POSITIONS), "exists": yes_no, "relation": yes_no}


# --------------------------------------------------------------------------------------------------------------------
# Labels and patch layout


def quadrant_patches(grid: int) -> list[list[int]]:
    """Row-major indices of each quadrant's patches on a ``grid`` x ``grid`` patch grid, quadrants in
    ``shapes.POSITIONS`` order (top left, top right, bottom left, bottom right)."""
    if grid < 2 or grid % 2:
        raise ValueError(f"quadrant probes need an even patch grid side >= 2, got {grid}")
    half = grid // 2
    return [[r * grid + c for r in range(qr * half, (qr + 1) * half) for c in range(qc * half, (qc + 1) * half)]
            for qr in (0, 1) for qc in (0, 1)]


def scene_labels(scenes: Sequence[Any]) -> dict[str, torch.Tensor]:
    """Class indices per scene: ``color``/``shape``/``size`` ``[N, 4]`` (-1 where the quadrant is empty), ``empty``
    ``[N, 4]`` (1 = empty) and ``count`` ``[N]`` (objects - 1)."""
    from vlm_chat.datasets import shapes

    vocab = {"color": shapes.COLORS, "shape": shapes.SHAPES, "size": shapes.SIZES}
    labels = {k: torch.full((len(scenes), 4), -1, dtype=torch.long) for k in vocab}
    labels["empty"] = torch.ones(len(scenes), 4, dtype=torch.long)
    for i, scene in enumerate(scenes):
        for obj in scene.objects:
            q = shapes.POSITIONS.index(obj.position)
            labels["empty"][i, q] = 0
            for key, names in vocab.items():
                labels[key][i, q] = names.index(getattr(obj, key))
    labels["count"] = torch.tensor([len(s.objects) - 1 for s in scenes], dtype=torch.long)
    return labels


# --------------------------------------------------------------------------------------------------------------------
# Features


def _pixel_values(chat: Any, tower: Any, images: list) -> torch.Tensor:
    if chat is not None:
        return chat.processor.pixel_values(images)
    from vlm_chat.images import bound_aspect

    # What VLMProcessor.pixel_values does, for a tower loaded without an LLM (no processor exists then).
    side = tower.model.config.image_size
    return tower.image_processor(images=[bound_aspect(im, side) for im in images], return_tensors="pt")["pixel_values"]


@torch.no_grad()
def extract_features(images: list, chat: Any = None, tower: Any = None, batch_size: int = 64,
                     pool: int = 1) -> dict[str, torch.Tensor]:
    """Features of every stage for ``images``, through the model's own modules.

    Args:
        images: RGB PIL images.
        chat: A ``VLMChat``: its tower, its processor and its mapper are used.
        tower: Or a ``vlm_chat.vision.VisionTower`` alone (no mapper stage).
        batch_size: Images per forward pass.
        pool: Above 1, also ``"avg{pool}x{pool}"``: the feature layer's patches averaged over ``pool`` x ``pool``
            blocks (what a 2x2-pooling mapper would keep of a patch-4 tower: 64 tokens from 256).

    Returns:
        ``{stage: [N, T, D]}``: ``"layer-1"`` ... ``"layer-K"`` (patch tokens of each hidden state, ``-K`` being the
        embeddings), ``"pooled"`` (``T = 1``), ``"feature_layer"`` (what ``model.vision`` returns: the configured
        layer, as the mapper sees it), with a chat ``"mapper"`` (the visual tokens the LLM receives) and ``avgPxP``.
    """
    if (chat is None) == (tower is None):
        raise ValueError("pass exactly one of chat= or tower=")
    vision = chat.model.vision if chat is not None else tower
    device = next(vision.parameters()).device
    parts: dict[str, list[torch.Tensor]] = {}
    for start in range(0, len(images), batch_size):
        pixels = _pixel_values(chat, vision, images[start : start + batch_size]).to(device)
        out = vision.model(pixel_values=pixels.to(next(vision.parameters()).dtype), output_hidden_states=True)
        first = 1 if vision.has_cls else 0  # patch tokens only
        hidden = out.hidden_states
        stages = {f"layer{k}": hidden[k][:, first:] for k in range(-1, -len(hidden) - 1, -1)}  # [B, grid^2, d_vis]
        stages["pooled"] = out.pooler_output.unsqueeze(1)  # [B, 1, d_vis]
        feats = vision(pixels)  # [B, N_patch, d_vis]: the mapper's input
        stages["feature_layer"] = feats
        if pool > 1:
            grid = vision.grid
            if grid % pool:
                raise ValueError(f"pool {pool} does not divide the {grid}x{grid} patch grid")
            square = feats.unflatten(1, (grid, grid)).permute(0, 3, 1, 2)  # [B, d_vis, grid, grid]
            pooled = F.avg_pool2d(square, pool)  # [B, d_vis, grid / pool, grid / pool]
            stages[f"avg{pool}x{pool}"] = pooled.flatten(2).transpose(1, 2)  # [B, (grid / pool)^2, d_vis]
        if chat is not None:
            stages["mapper"] = chat.model.encode_images(image_features=feats)  # [B, N_vis, d_lm]
        for name, value in stages.items():
            parts.setdefault(name, []).append(value.float().cpu())
    return {name: torch.cat(chunks) for name, chunks in parts.items()}


# --------------------------------------------------------------------------------------------------------------------
# Probes


def _fit(x: torch.Tensor, y: torch.Tensor, num_classes: int, weight_decay: float, max_iter: int) -> torch.Tensor:
    """Multinomial logistic regression weights ``[D + 1, C]`` (last row: bias) by full-batch L-BFGS.

    Hand-written because scikit-learn is not a dependency of the project; L-BFGS on a convex loss is what
    scikit-learn's LogisticRegression does by default too.
    """
    x1 = torch.cat([x, torch.ones(len(x), 1)], 1)  # [N, D + 1]
    w = torch.zeros(x1.shape[1], num_classes, requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(x1 @ w, y) + weight_decay * w[:-1].pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return w.detach()


def _predict(w: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return (torch.cat([x, torch.ones(len(x), 1)], 1) @ w).argmax(1)


def fit_probe(x_train: torch.Tensor, y_train: torch.Tensor, x_test: torch.Tensor,
              weight_decays: Sequence[float] = WEIGHT_DECAYS, max_iter: int = 100, holdout: float = 0.2) -> dict[str, Any]:
    """Fit a linear probe and predict the test rows.

    Features are z-scored with the training rows' statistics. The L2 weight is the one of ``weight_decays`` with the
    best accuracy on the last ``holdout`` fraction of the training rows (fitted on the rest); the probe is then
    refitted on all training rows.

    Args:
        x_train: ``[N, D]`` features.
        y_train: ``[N]`` class indices.
        x_test: ``[M, D]`` features.
        weight_decays: L2 weights to choose from.
        max_iter: L-BFGS iterations per fit.
        holdout: Fraction of the training rows that chooses the L2 weight.

    Returns:
        ``{"predictions": [M] tensor, "weight_decay": chosen, "holdout_accuracy": its accuracy}``.
    """
    if len(x_train) != len(y_train) or len(x_train) < 5:
        raise ValueError(f"a probe needs >= 5 training rows and one label each; got {len(x_train)} and {len(y_train)}")
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)
    x_train, x_test = (x_train - mean) / std, (x_test - mean) / std
    num_classes = int(y_train.max()) + 1
    cut = len(x_train) - max(1, round(holdout * len(x_train)))
    best = (-1.0, weight_decays[0])
    if len(weight_decays) > 1:
        for wd in weight_decays:
            w = _fit(x_train[:cut], y_train[:cut], num_classes, wd, max_iter)
            acc = (_predict(w, x_train[cut:]) == y_train[cut:]).float().mean().item()
            if acc > best[0]:
                best = (acc, wd)
    w = _fit(x_train, y_train, num_classes, best[1], max_iter)
    return {"predictions": _predict(w, x_test), "weight_decay": best[1], "holdout_accuracy": best[0]}


def _rows(feats: torch.Tensor, patches: list[int] | None) -> torch.Tensor:
    picked = feats if patches is None else feats[:, patches]  # [N, T', D]
    return picked.flatten(1)  # [N, T' * D]


def probe_stage(train: torch.Tensor, test: torch.Tensor, y_train: dict[str, torch.Tensor],
                y_test: dict[str, torch.Tensor], grid: int, **probe_kwargs: Any) -> dict[str, dict[str, Any]]:
    """Accuracy of every target's probe on one stage's features.

    Args:
        train: ``[N, T, D]`` features of the probe-training scenes.
        test: ``[M, T, D]`` features of the probe-test scenes.
        y_train: :func:`scene_labels` of the training scenes.
        y_test: :func:`scene_labels` of the test scenes.
        grid: Patch grid side; quadrant probes read their quadrant's tokens when ``T == grid**2``, else all tokens.
        **probe_kwargs: Passed to :func:`fit_probe`.

    Returns:
        ``{target: {"accuracy", "n", "majority" (accuracy of always answering the most frequent training class),
        "by_quadrant": [4 accuracies] (quadrant targets), "by_size": {"small", "large"} (object targets),
        "weight_decay": [chosen per probe]}}``.
    """
    from vlm_chat.datasets import shapes

    all_train, all_test = train, test  # the count reads every token, a kept CLS token included
    if train.shape[1] == grid**2 + 1:  # a tower that keeps its CLS token puts it first: the patches follow
        train, test = train[:, 1:], test[:, 1:]
    per_patch = train.shape[1] == grid**2
    quadrants = quadrant_patches(grid) if per_patch else [None] * 4
    result: dict[str, dict[str, Any]] = {}
    right: dict[str, list[torch.Tensor]] = {}
    for target in QUADRANT_TARGETS:
        hits, majority_hits, by_quadrant, wds, sizes = [], [], [], [], []
        chosen = None  # the L2 weight is chosen on the first quadrant and reused: a quarter of the fits
        for q, patches in enumerate(quadrants):
            tr = y_train[target][:, q] >= 0
            te = y_test[target][:, q] >= 0
            if target != "empty":  # attributes of the object there: occupied quadrants only
                tr, te = tr & (y_train["empty"][:, q] == 0), te & (y_test["empty"][:, q] == 0)
            ytr, yte = y_train[target][tr, q], y_test[target][te, q]
            kwargs = probe_kwargs if chosen is None else {**probe_kwargs, "weight_decays": [chosen]}
            fit = fit_probe(_rows(train[tr], patches), ytr, _rows(test[te], patches), **kwargs)
            chosen = fit["weight_decay"]
            hit = fit["predictions"] == yte
            hits.append(hit)
            sizes.append(y_test["size"][te, q])
            majority_hits.append(yte == Counter(ytr.tolist()).most_common(1)[0][0])
            by_quadrant.append(hit.float().mean().item() if len(hit) else float("nan"))
            wds.append(fit["weight_decay"])
            if target in ("color", "shape"):
                full = torch.zeros(len(test), dtype=torch.bool)
                full[te] = hit
                right.setdefault(target, []).append(full)
        all_hits = torch.cat(hits)
        result[target] = {"accuracy": all_hits.float().mean().item(), "n": len(all_hits),
                          "majority": torch.cat(majority_hits).float().mean().item(), "by_quadrant": by_quadrant,
                          "weight_decay": wds}
        if target != "empty":  # small shapes cover about 2x2 patches, large ones 3x3 to 4x4
            size_of = torch.cat(sizes)
            result[target]["by_size"] = {
                name: all_hits[size_of == k].float().mean().item() for k, name in enumerate(shapes.SIZES)
            }
    occupied = y_test["empty"] == 0  # [M, 4]
    both = torch.stack(right["color"], 1) & torch.stack(right["shape"], 1)  # [M, 4]
    result["object"] = {"accuracy": both[occupied].float().mean().item(), "n": int(occupied.sum())}
    fit = fit_probe(_rows(all_train, None), y_train["count"], _rows(all_test, None), **probe_kwargs)
    majority = Counter(y_train["count"].tolist()).most_common(1)[0][0]
    result["count"] = {"accuracy": (fit["predictions"] == y_test["count"]).float().mean().item(), "n": len(test),
                       "majority": (y_test["count"] == majority).float().mean().item(),
                       "weight_decay": [fit["weight_decay"]]}
    if per_patch:
        result["where"] = where_probe(train, test, y_train, y_test, grid, **probe_kwargs)
    return result


def where_probe(train: torch.Tensor, test: torch.Tensor, y_train: dict[str, torch.Tensor],
                y_test: dict[str, torch.Tensor], grid: int, **probe_kwargs: Any) -> dict[str, Any]:
    """Does one token say where it is? A probe from a single patch token to its quadrant (4 classes, chance 0.25).

    Only tokens of occupied quadrants count: those are the ones a "Where is the ...?" answer must place. The
    quadrant probes above cannot tell this: they read each quadrant's own tokens, so the place is given to them. An
    LLM attends to a token by its content; if the content does not hold the place, only the token order does.
    """
    quadrant = torch.empty(grid**2, dtype=torch.long)
    for q, patches in enumerate(quadrant_patches(grid)):
        quadrant[patches] = q

    def rows(feats: torch.Tensor, labels: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        occupied = (labels["empty"] == 0)[:, quadrant]  # [N, T]: the token's quadrant holds an object
        return feats[occupied], quadrant.expand(len(feats), -1)[occupied]  # [K, D], [K]

    (xtr, ytr), (xte, yte) = rows(train, y_train), rows(test, y_test)
    fit = fit_probe(xtr, ytr, xte, **probe_kwargs)
    return {"accuracy": (fit["predictions"] == yte).float().mean().item(), "n": len(yte),
            "majority": (yte == Counter(ytr.tolist()).most_common(1)[0][0]).float().mean().item(),
            "weight_decay": [fit["weight_decay"]]}


# --------------------------------------------------------------------------------------------------------------------
# LLM answers


def llm_answers(chat: Any, scenes: Sequence[Any], batch_size: int = 16, max_new_tokens: int = 8,
                progress: bool = True) -> dict[str, Any]:
    """Accuracy per ``shapes.qa_pairs`` question type on ``scenes`` (greedy; first vocabulary answer in the reply).

    Returns:
        ``{"accuracy", "n", "by_type": {qtype: {"accuracy", "n", "unanswered"}}, "rows": [{"scene", "qtype",
        "question", "answer", "reply", "correct"}]}``.
    """
    from vlm_chat.datasets import shapes
    from vlm_chat.eval import extract_answer, generate_grouped, normalize_answer

    vocab = answer_vocabularies()
    images, questions, meta = [], [], []
    for i, scene in enumerate(scenes):
        image = scene.render()  # one object per scene: generate_grouped batches an image's questions together
        for qa in shapes.qa_pairs(scene):
            if qa.qtype not in vocab:
                raise ValueError(f"shapes.qa_pairs made a question of unknown type {qa.qtype!r}: add its vocabulary")
            images.append(image)
            questions.append(qa.question)
            meta.append((i, qa))
    replies = generate_grouped(chat, images, questions, batch_size, "llm", progress, max_new_tokens=max_new_tokens)
    rows, by_type = [], {}
    for (i, qa), reply in zip(meta, replies):
        got = extract_answer(reply, vocab[qa.qtype])
        correct = got == normalize_answer(qa.answer)
        rows.append({"scene": i, "qtype": qa.qtype, "question": qa.question, "answer": qa.answer, "reply": reply,
                     "correct": correct})
        entry = by_type.setdefault(qa.qtype, {"correct": 0, "n": 0, "unanswered": 0})
        entry["correct"] += correct
        entry["n"] += 1
        entry["unanswered"] += got is None
    for entry in by_type.values():
        entry["accuracy"] = entry.pop("correct") / entry["n"]
    total = sum(r["correct"] for r in rows)
    return {"accuracy": total / max(1, len(rows)), "n": len(rows), "by_type": dict(sorted(by_type.items())),
            "rows": rows}


# --------------------------------------------------------------------------------------------------------------------
# The whole measurement


def run_probes(
    chat: Any = None,
    tower: Any = None,
    train_scenes: int = 1500,
    test_scenes: int = 400,
    llm_scenes: int = 100,
    train_seed: int = TRAIN_SEED,
    test_seed: int = VALIDATION_SEED,
    batch_size: int = 16,
    pool: int = 1,
    stages: Sequence[str] | None = None,
    **probe_kwargs: Any,
) -> dict[str, Any]:
    """Probe every stage of ``chat`` (or of ``tower`` alone) and measure the LLM's answers on the same test scenes.

    Args:
        chat: A ``VLMChat``.
        tower: Or a ``VisionTower`` (then no mapper and no LLM stage).
        train_scenes: Probe-training scenes (of ``train_seed``).
        test_scenes: Probe-test scenes (of ``test_seed``).
        llm_scenes: How many of the probe-test scenes the LLM answers every question of (0: none).
        train_seed: Shapes-world seed of the probe-training scenes.
        test_seed: Shapes-world seed of the probe-test scenes; the test seed 1234 is refused.
        batch_size: Questions per ``generate_batch`` call.
        pool: See :func:`extract_features`.
        stages: Probe only these stages (default: all); names as in :func:`extract_features`.
        **probe_kwargs: Passed to :func:`fit_probe` (``weight_decays``, ``max_iter``).

    Returns:
        ``{"setup": {...}, "probes": {stage: probe_stage result}, "llm": llm_answers result or None,
        "seconds": {...}}``.
    """
    from vlm_chat.datasets import shapes

    if TEST_SEED in (train_seed, test_seed):
        raise ValueError(f"seed {TEST_SEED} is the shapes world's test seed, read only for final reports; "
                         f"probe on the training ({TRAIN_SEED}) and validation ({VALIDATION_SEED}) seeds")
    if train_seed == test_seed:
        raise ValueError(f"train_seed and test_seed are both {train_seed}: the probe-test scenes must be held out")
    if not 0 <= llm_scenes <= test_scenes:
        raise ValueError(f"llm_scenes must be in 0..test_scenes ({test_scenes}), got {llm_scenes}")
    vision = chat.model.vision if chat is not None else tower
    cfg = vision.model.config
    size, grid = cfg.image_size, vision.grid
    seconds = {}
    t0 = time.perf_counter()
    train = shapes.generate_scenes(train_scenes, seed=train_seed, image_size=size)
    test = shapes.generate_scenes(test_scenes, seed=test_seed, image_size=size)
    feats = {}
    for name, scenes in (("train", train), ("test", test)):
        feats[name] = extract_features([s.render() for s in scenes], chat=chat, tower=tower, pool=pool)
    configured = f"layer{vision.feature_layer}"
    # model.vision's output is that layer's patch tokens (checked here, not assumed): probe it once, under its name.
    same = all(torch.equal(f["feature_layer"], f[configured]) for f in feats.values())
    if same:
        for f in feats.values():
            del f["feature_layer"]
    seconds["features"] = time.perf_counter() - t0
    unknown = sorted(set(stages or ()) - set(feats["train"]))
    if unknown:
        raise ValueError(f"unknown stages {unknown}; valid: {sorted(feats['train'])}")
    y_train, y_test = scene_labels(train), scene_labels(test)
    probes = {}
    t0 = time.perf_counter()
    for stage in [s for s in feats["train"] if not stages or s in stages]:
        logger.info("probing %s %s", stage, tuple(feats["train"][stage].shape))
        side = grid // pool if stage == f"avg{pool}x{pool}" else grid  # an averaged stage has a coarser grid
        probes[stage] = probe_stage(feats["train"][stage], feats["test"][stage], y_train, y_test, side, **probe_kwargs)
    seconds["probes"] = time.perf_counter() - t0
    llm = None
    if chat is not None and llm_scenes:
        t0 = time.perf_counter()
        llm = llm_answers(chat, test[:llm_scenes], batch_size=batch_size)
        seconds["llm"] = time.perf_counter() - t0
    setup = {"image_size": size, "patch_grid": grid, "layers": cfg.num_hidden_layers,
             "feature_layer": vision.feature_layer, "feature_layer_is_patch_tokens": same,
             "pool": pool, "train_scenes": train_scenes, "train_seed": train_seed, "test_scenes": test_scenes, "test_seed": test_seed,
             "llm_scenes": llm_scenes if llm else 0,
             "probe": "multinomial logistic regression, torch L-BFGS, z-scored features, L2 chosen on a holdout fifth"}
    return {"setup": setup, "probes": probes, "llm": llm, "seconds": seconds}


# Which LLM question types read which probe target (the table's last column).
LLM_TYPES = {"color": ("color",), "shape": ("shape",), "size": ("size",), "empty": ("exists",),
             "object": ("position",), "count": ("count",), "where": ("position",)}


def table(result: dict[str, Any]) -> str:
    """Markdown: rows are targets, columns the configured layer, the best other layer, the mapper and the LLM."""
    probes = result["probes"]
    feature_layer = "feature_layer" if "feature_layer" in probes else f"layer{result['setup']['feature_layer']}"
    feature_layer = feature_layer if feature_layer in probes else next(iter(probes))
    others = [s for s in probes if s not in ("feature_layer", "mapper", feature_layer)]
    head = ["target", "majority", f"tower {feature_layer}", "best other stage", "mapper output", "LLM answers"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for target in [t for t in TARGETS if t in probes[feature_layer]]:
        having = [s for s in others if target in probes[s]]  # `where` needs one token per patch
        best = max(having, key=lambda s: probes[s][target]["accuracy"]) if having else None
        cells = [target, f"{probes[feature_layer][target].get('majority', float('nan')):.2f}",
                 f"{probes[feature_layer][target]['accuracy']:.3f}",
                 f"{probes[best][target]['accuracy']:.3f} ({best})" if best else "-"]
        cells.append(f"{probes['mapper'][target]['accuracy']:.3f}" if target in probes.get("mapper", {}) else "-")
        by_type = (result.get("llm") or {}).get("by_type", {})
        cells.append(", ".join(f"{t} {by_type[t]['accuracy']:.3f}" for t in LLM_TYPES[target] if t in by_type) or "-")
        lines.append("| " + " | ".join(cells) + " |")
    if result.get("llm"):
        by_type = result["llm"]["by_type"]
        lines += ["", "| LLM question type | accuracy | n | unanswered |", "|---|---|---|---|"]
        lines += [f"| {t} | {v['accuracy']:.3f} | {v['n']} | {v['unanswered']} |" for t, v in by_type.items()]
    lines += ["", "| stage | " + " | ".join(TARGETS) + " |", "|" + "---|" * (len(TARGETS) + 1)]
    lines += [f"| {s} | " + " | ".join(f"{p[t]['accuracy']:.3f}" if t in p else "-" for t in TARGETS) + " |"
              for s, p in probes.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="VLM checkpoint directory (default: the shipped demo model).")
    parser.add_argument("--vision", default=None, help="Probe this CLIP/SigLIP directory alone instead (no LLM).")
    parser.add_argument("--feature-layer", type=int, default=-2, help="With --vision: the layer named the mapper's.")
    parser.add_argument("--train-scenes", type=int, default=1500)
    parser.add_argument("--test-scenes", type=int, default=400)
    parser.add_argument("--llm-scenes", type=int, default=100, help="Probe-test scenes the LLM answers (0: skip).")
    parser.add_argument("--train-seed", type=int, default=TRAIN_SEED)
    parser.add_argument("--test-seed", type=int, default=VALIDATION_SEED)  # 1234, the test seed, is refused
    parser.add_argument("--batch-size", type=int, default=16, help="Questions per generate_batch call.")
    parser.add_argument("--weight-decays", type=float, nargs="+", default=list(WEIGHT_DECAYS))
    parser.add_argument("--max-iter", type=int, default=100, help="L-BFGS iterations per probe fit.")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads. 1 by default: on a shared 2-core machine, 2 threads made the small L-BFGS "
                        "fits up to 60x slower.")
    parser.add_argument("--pool", type=int, default=1, help="Also probe the feature layer averaged over NxN patches.")
    parser.add_argument("--stages", nargs="+", default=None, help="Probe only these stages (default: all).")
    parser.add_argument("--output", default=None, help="Write the full result (with every LLM reply) as JSON here.")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.vision and args.model:
        parser.error("give --model or --vision, not both")
    chat = tower = None
    if args.vision:
        from vlm_chat.config import VisionConfig
        from vlm_chat.vision import VisionTower

        tower = VisionTower(VisionConfig(name_or_path=args.vision, feature_layer=args.feature_layer))
    else:
        import vlm_chat
        from vlm_chat import VLMChat

        chat = VLMChat.from_pretrained(args.model or vlm_chat.DEMO_MODEL, device="cpu")
    result = run_probes(
        chat, tower, args.train_scenes, args.test_scenes, args.llm_scenes if chat is not None else 0,
        args.train_seed, args.test_seed, args.batch_size, args.pool, args.stages, weight_decays=args.weight_decays,
        max_iter=args.max_iter,
    )
    result["setup"]["source"] = args.vision or args.model or "vlm_chat/demo_model"
    print(table(result) + "\n" + json.dumps(result["seconds"]))  # CLI output
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
