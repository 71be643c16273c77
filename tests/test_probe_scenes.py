"""bench.probe_scenes: quadrant layout, labels, a probe that must learn a separable target, and a run on a tiny VLM."""

from __future__ import annotations

import pytest
import torch

from bench import probe_scenes
from vlm_chat.datasets import shapes


@pytest.fixture(autouse=True)
def one_thread():
    # L-BFGS on small problems is thousands of tiny ops: on a loaded 2-core machine, 2 threads made one probe fit
    # 60x slower than 1 (8.8 s vs 0.14 s, measured).
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_quadrant_patches_follow_the_positions_order():
    # 4x4 grid: rows 0-1 are the top, columns 0-1 the left.
    assert probe_scenes.quadrant_patches(4) == [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
    with pytest.raises(ValueError, match="even patch grid"):
        probe_scenes.quadrant_patches(3)


def test_scene_labels_put_each_object_in_its_quadrant():
    scene = shapes.generate_scene(seed=1, index=0)
    labels = probe_scenes.scene_labels([scene])
    occupied = {shapes.POSITIONS.index(o.position): o for o in scene.objects}
    for q in range(4):
        if q in occupied:
            o = occupied[q]
            assert labels["empty"][0, q] == 0
            assert labels["color"][0, q] == shapes.COLORS.index(o.color)
            assert labels["shape"][0, q] == shapes.SHAPES.index(o.shape)
            assert labels["size"][0, q] == shapes.SIZES.index(o.size)
        else:
            assert labels["empty"][0, q] == 1 and labels["color"][0, q] == -1
    assert labels["count"][0] == len(scene.objects) - 1


def test_probe_learns_a_separable_target_and_not_noise():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(3, 20, generator=gen) * 4
    y = torch.randint(0, 3, (300,), generator=gen)
    x = centers[y] + torch.randn(300, 20, generator=gen) * 0.1  # three far-apart clusters
    fit = probe_scenes.fit_probe(x[:200], y[:200], x[200:])
    assert torch.equal(fit["predictions"], y[200:])
    # Labels independent of the features: a linear probe cannot beat chance by much on held-out rows.
    noise = torch.randint(0, 2, (300,), generator=gen)
    fit = probe_scenes.fit_probe(x[:200], noise[:200], x[200:])
    assert (fit["predictions"] == noise[200:]).float().mean() < 0.7


def test_where_probe_reads_a_place_only_where_the_tokens_hold_it():
    """Features that are a token's place (one vector per grid position) give its quadrant exactly; features that are
    the same at every place (what a tower gives when its layers wash the position embedding out) give chance."""
    from vlm_chat.datasets import shapes

    gen = torch.Generator().manual_seed(0)
    scenes = shapes.generate_scenes(40, seed=1, image_size=32)
    labels = probe_scenes.scene_labels(scenes)
    place = torch.randn(16, 32, generator=gen)  # 4x4 grid, one vector per position (16 points in 32-d: separable)
    content = torch.randn(40, 1, 32, generator=gen).expand(-1, 16, -1)  # per image, the same at every place
    placed = 0.3 * content + place + 0.01 * torch.randn(40, 16, 32, generator=gen)
    train, test = {k: v[:30] for k, v in labels.items()}, {k: v[30:] for k, v in labels.items()}
    assert probe_scenes.where_probe(placed[:30], placed[30:], train, test, grid=4)["accuracy"] == 1.0
    blind = probe_scenes.where_probe(content[:30], content[30:], train, test, grid=4)
    assert blind["accuracy"] < 0.5 and blind["n"] == 4 * int((test["empty"] == 0).sum())


def test_run_refuses_the_test_seed():
    with pytest.raises(ValueError, match="test seed"):
        probe_scenes.run_probes(tower=object(), test_seed=1234)


def test_run_probes_on_a_tiny_vlm(tiny_clip_dir, tiny_smollm2_dir):
    from vlm_chat import VLMChat

    chat = VLMChat.from_components(str(tiny_clip_dir), str(tiny_smollm2_dir), device="cpu")
    result = probe_scenes.run_probes(chat, train_scenes=24, test_scenes=8, llm_scenes=1, batch_size=8,
                                     weight_decays=[1e-2], max_iter=10)
    # model.vision's output is layer -2's patch tokens, so it is probed once, as layer-2.
    assert result["setup"]["feature_layer_is_patch_tokens"] is True
    assert set(result["probes"]) == {"layer-1", "layer-2", "layer-3", "pooled", "mapper"}
    test_scenes = shapes.generate_scenes(8, seed=2, image_size=32)
    occupied = sum(len(s.objects) for s in test_scenes)
    for name, stage in result["probes"].items():
        assert stage["empty"]["n"] == 8 * 4
        assert stage["color"]["n"] == stage["object"]["n"] == occupied
        assert stage["count"]["n"] == 8
        if name != "pooled":  # one token: no place to read
            assert stage["where"]["n"] == 4 * occupied  # a 4x4 grid: 4 patch tokens a quadrant
    expected = {}
    for scene in test_scenes[:1]:
        for qa in shapes.qa_pairs(scene):
            expected[qa.qtype] = expected.get(qa.qtype, 0) + 1
    assert {t: v["n"] for t, v in result["llm"]["by_type"].items()} == expected
    assert "| count |" in probe_scenes.table(result) and "| where |" in probe_scenes.table(result)
    # A mapper that is handed the CLS token too (drop_cls false) is probed on its patch tokens, not on all of them.
    from vlm_chat.config import LMConfig, VisionConfig, VLMConfig

    kept = VLMChat.from_config(VLMConfig(vision=VisionConfig(name_or_path=str(tiny_clip_dir), drop_cls=False),
                                         lm=LMConfig(name_or_path=str(tiny_smollm2_dir))), device="cpu")
    result = probe_scenes.run_probes(kept, train_scenes=24, test_scenes=8, llm_scenes=0, weight_decays=[1e-2],
                                     max_iter=10, stages=["mapper"])
    assert len(result["probes"]["mapper"]["color"]["by_quadrant"]) == 4 and "where" in result["probes"]["mapper"]


def test_pool_averages_each_2x2_block_and_probes_it_on_its_own_grid(tiny_clip_dir):
    from vlm_chat.config import VisionConfig
    from vlm_chat.vision import VisionTower

    tower = VisionTower(VisionConfig(name_or_path=str(tiny_clip_dir), feature_layer=-2))  # 32 px / 8 px: 4x4 grid
    images = [s.render() for s in shapes.generate_scenes(3, seed=1, image_size=32)]
    feats = probe_scenes.extract_features(images, tower=tower, pool=2)
    layer, pooled = feats["layer-2"], feats["avg2x2"]  # [3, 16, 32], [3, 4, 32]
    assert pooled.shape == (3, 4, layer.shape[2])
    # Block (1, 0) of the 2x2 grid is patches 8, 9, 12, 13 of the 4x4 grid (row-major).
    torch.testing.assert_close(pooled[:, 2], layer[:, [8, 9, 12, 13]].mean(1))
    with pytest.raises(ValueError, match="does not divide"):
        probe_scenes.extract_features(images, tower=tower, pool=3)
    result = probe_scenes.run_probes(tower=tower, train_scenes=24, test_scenes=8, llm_scenes=0, pool=2,
                                     stages=["avg2x2", "pooled"], weight_decays=[1e-2], max_iter=10)
    assert set(result["probes"]) == {"avg2x2", "pooled"}
    assert result["setup"]["pool"] == 2 and result["probes"]["avg2x2"]["empty"]["n"] == 8 * 4
    with pytest.raises(ValueError, match="unknown stages"):
        probe_scenes.run_probes(tower=tower, train_scenes=8, test_scenes=4, llm_scenes=0, stages=["layer-9"])
