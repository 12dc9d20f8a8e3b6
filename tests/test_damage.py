"""Bi-temporal damage assessment: generated pairs, the BRIGHT reader, metrics, the Siamese model, the CLI."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import numpy as np
import pytest
import tifffile
import torch
import yaml
from torchmetrics.functional.classification import multiclass_confusion_matrix

from codemae.cli import build_parser, main
from codemae.config import SyntheticConfig, to_dict
from codemae.data.readers import GDAL_NODATA
from codemae.data.stats import compute_stats
from codemae.data.synthetic import DAMAGED, DESTROYED, INTACT, generate_damage_pair, land_cover
from codemae.data.write_synthetic import TASKS, write_synthetic
from codemae.eval.damage import (LOC_CLASSES, DamageProtocol, SiameseDamage, balanced_weights, damage_loss,
                                 damage_map, damage_scores, fresh_model, predict_scene, train_damage)
from codemae.eval.damage_data import DamageCrops, DamageScenes
from codemae.eval.features import method_to_evaluate
from codemae.methods import build_method

from conftest import tiny_config


@pytest.fixture
def bright(tmp_path):
    root = tmp_path / "bright"
    write_synthetic("damage", root, n=5, size=48, seed=7)
    return root


def write_config(tmp_path):
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))
    return path


def test_pairs_are_deterministic_and_labels_sit_on_the_drawn_buildings():
    cfg = SyntheticConfig(image_size=64)
    a, b = generate_damage_pair(5, cfg), generate_damage_pair(5, cfg)
    for x, y in ((a.optical, b.optical), (a.sar, b.sar), (a.target, b.target)):
        assert np.array_equal(x, y)
    assert not np.array_equal(a.sar, generate_damage_pair(6, cfg).sar)
    _, buildings, _ = land_cover(np.random.default_rng(5), 64)  # the map the pair was drawn from
    assert np.array_equal(a.target > 0, buildings)
    assert set(np.unique(a.target)) <= {0, INTACT, DAMAGED, DESTROYED}


def test_pairs_are_the_same_in_another_process():
    code = ("import hashlib, sys; from codemae.config import SyntheticConfig; "
            "from codemae.data.synthetic import generate_damage_pair as g; p = g(11, SyntheticConfig(image_size=48)); "
            "sys.stdout.write(hashlib.sha256(p.optical.tobytes() + p.sar.tobytes() + p.target.tobytes()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    p = generate_damage_pair(11, SyntheticConfig(image_size=48))
    assert other == hashlib.sha256(p.optical.tobytes() + p.sar.tobytes() + p.target.tobytes()).hexdigest()


def test_damage_changes_the_sar_returns_of_the_buildings():
    pairs = [generate_damage_pair(s, SyntheticConfig(image_size=128)) for s in range(4)]
    target = np.concatenate([p.target.ravel() for p in pairs])
    sar = np.concatenate([p.sar.ravel() for p in pairs])
    assert {INTACT, DAMAGED, DESTROYED} <= set(np.unique(target))
    mean = {k: sar[target == k].mean() for k in (INTACT, DAMAGED, DESTROYED)}
    assert mean[INTACT] > mean[DAMAGED] + 0.05 and mean[INTACT] > mean[DESTROYED] + 0.05
    # layover: the strip beside a standing building is bright, beside a destroyed one it is not
    shift = 128 // 64
    strip = {k: np.concatenate([p.sar[:, :, 0][np.roll(p.target == k, -shift, axis=1) & (p.target == 0)]
                                for p in pairs]).mean() for k in (INTACT, DESTROYED)}
    assert strip[INTACT] > strip[DESTROYED] + 0.1
    # the optical "before" scene shows every building standing: one roof colour per scene
    for p in pairs:
        roofs = p.optical[p.target > 0]
        assert np.allclose(roofs, roofs[0])


def test_synth_writes_the_bright_layout_and_the_reader_reads_it_back(bright):
    assert (bright / "pre-event" / "synthetic_00000_pre_disaster.tif").is_file()
    assert [len((bright / f"{s}.txt").read_text().split()) for s in ("train", "val", "test")] == [3, 1, 1]
    scenes = DamageScenes(bright, "train", {"opt": 3, "sar": 1})
    pair = generate_damage_pair(7, SyntheticConfig(image_size=48))
    arrays = scenes.load(0)
    assert arrays["opt"].shape == (48, 48, 3) and arrays["sar"].shape == (48, 48, 1)
    np.testing.assert_allclose(arrays["opt"], pair.optical, atol=0.5 / 255 + 1e-6)
    assert np.array_equal(scenes.target(0), pair.target)
    drawn = sum(np.bincount(generate_damage_pair(7 + i, SyntheticConfig(image_size=48)).target.ravel(), minlength=4)
                for i in range(3))
    assert scenes.class_counts().tolist() == drawn.tolist()
    for task in TASKS:  # every task the writer knows is offered by the command
        assert build_parser().parse_args(["synth", "--task", task, "--out", "x"]).task == task


def test_a_model_that_copies_the_label_scores_one():
    target = torch.tensor([[0, 0, 1, 1], [2, 2, 3, 3], [0, 1, 2, 3]])
    logits = torch.full((LOC_CLASSES + 4, 3, 4), -5.0)
    logits[1] = torch.where(target > 0, 5.0, -5.0)  # building where the label says so
    logits[LOC_CLASSES:] = torch.nn.functional.one_hot(target, 4).permute(2, 0, 1) * 10.0
    pred = damage_map(logits)
    assert torch.equal(pred, target)
    scores = damage_scores(multiclass_confusion_matrix(pred.flatten(), target.flatten(), 4))
    assert scores["mIoU"] == pytest.approx(100) and scores["F1 loc"] == pytest.approx(100)
    assert scores["F1 damage"] == pytest.approx(100) and scores["score"] == pytest.approx(100)


def test_xview2_scores_by_hand():
    # rows: target (bg, intact, damaged, destroyed), columns: prediction
    cm = torch.tensor([[10, 2, 0, 0],
                       [1, 6, 1, 0],
                       [0, 2, 3, 1],
                       [0, 0, 0, 4]])
    s = damage_scores(cm)
    # localisation: TP = 6+1+2+3+1+4 = 17, FP = 2, FN = 1 -> F1 = 34 / 37
    assert s["F1 loc"] == pytest.approx(100 * 34 / 37)
    # on building rows: intact TP 6, FP 2, FN 2 -> 12/16; damaged TP 3, FP 1, FN 3 -> 6/10;
    # destroyed TP 4, FP 1, FN 0 -> 8/9
    per = [12 / 16, 6 / 10, 8 / 9]
    assert [s["F1 intact"], s["F1 damaged"], s["F1 destroyed"]] == pytest.approx([100 * f for f in per])
    harmonic = 3 / sum(1 / f for f in per)
    assert s["F1 damage"] == pytest.approx(100 * harmonic)
    assert s["score"] == pytest.approx(100 * (0.3 * 34 / 37 + 0.7 * harmonic))
    # IoU: bg 10/(12+11-10), intact 6/(8+10-6), damaged 3/(6+4-3), destroyed 4/(4+5-4)
    ious = [10 / 13, 6 / 12, 3 / 7, 4 / 5]
    assert s["IoU destroyed"] == pytest.approx(100 * 4 / 5)
    assert s["mIoU"] == pytest.approx(100 * sum(ious) / 4)


def test_an_absent_damage_class_is_left_out_of_the_harmonic_mean():
    cm = torch.tensor([[5, 0, 0, 0], [0, 4, 0, 0], [0, 0, 2, 0], [0, 0, 0, 0]])
    s = damage_scores(cm)
    assert s["F1 damage"] == pytest.approx(100) and s["mIoU"] == pytest.approx(100)
    assert np.isnan(s["IoU destroyed"])
    cm[3, 1] = 3  # destroyed buildings called intact: destroyed F1 0 zeroes the harmonic mean
    s = damage_scores(cm)
    assert s["F1 destroyed"] == 0 and s["F1 damage"] == 0 and s["score"] == pytest.approx(0.3 * s["F1 loc"])


def tiny_model(tmp_path):
    torch.manual_seed(0)
    return SiameseDamage(build_method(tiny_config(tmp_path)), width=16)


def test_the_siamese_model_trains_and_its_loss_falls(tmp_path, bright):
    model = tiny_model(tmp_path)
    scenes = DamageScenes(bright, "train", {"opt": 3, "sar": 1})
    norms = compute_stats(scenes, 8)
    crops = DamageCrops(scenes, norms, 32, 2, torch.Generator().manual_seed(0))
    pre, post, target = crops[0]
    assert pre.shape == (3, 32, 32) and post.shape == (1, 32, 32) and target.shape == (32, 32)
    protocol = DamageProtocol(epochs=6, warmup_epochs=0, batch_size=3, lr=1e-2)
    history = train_damage(model, crops, protocol, seed=0, counts=torch.tensor([900, 50, 30, 20]))
    assert history[-1] < 0.6 * history[0]


def test_balanced_weights_by_hand():
    # freq 0.9 / 0.1 -> frequency^-1/2 = 1.054 / 3.162, scaled to a pixel mean of 1 -> 5/6 and 5/2
    torch.testing.assert_close(balanced_weights(torch.tensor([90, 10])), torch.tensor([5 / 6, 5 / 2]))


def test_siamese_embeds_pre_as_optical_and_post_as_sar(tmp_path):
    model = tiny_model(tmp_path).eval()
    pre, post = torch.randn(2, 3, 32, 32), torch.randn(2, 1, 32, 32)
    out = model(pre, post)
    assert out.shape == (2, LOC_CLASSES + 4, 32, 32)
    assert damage_loss(out, torch.randint(0, 4, (2, 32, 32))).ndim == 0
    seen = {}  # the optical patch embedding sees the pre image, the SAR one the post image, once each
    for m, embed in model.method.encoder.patch_embed.items():
        embed.register_forward_pre_hook(lambda _, args, m=m: seen.setdefault(m, []).append(args[0]))
    with torch.no_grad():
        model(pre, post)
    assert [len(v) for v in seen.values()] == [1, 1]
    assert torch.equal(seen["opt"][0], pre) and torch.equal(seen["sar"][0], post)


def test_each_seed_initialises_its_own_encoder_and_decoder_even_when_loading_reseeds(tmp_path):
    config = write_config(tmp_path)
    models = [fresh_model(lambda s: method_to_evaluate(None, str(config), s), seed) for seed in (0, 1, 1)]
    for weights in ([m.fuse[0][0].weight for m in models],
                    [torch.cat([p.flatten() for p in m.method.encoder.parameters()]) for m in models]):
        assert not torch.equal(weights[0], weights[1]) and torch.equal(weights[1], weights[2])


def test_scene_prediction_stitches_windows_like_a_manual_loop(tmp_path):
    model = tiny_model(tmp_path).eval()
    pre, post = torch.randn(3, 48, 48), torch.randn(1, 48, 48)
    with torch.no_grad():
        total, count = torch.zeros(6, 48, 48), torch.zeros(1, 48, 48)
        for y in (0, 16):  # window 32, stride 16
            for x in (0, 16):
                total[:, y:y + 32, x:x + 32] += model(pre[None, :, y:y + 32, x:x + 32],
                                                      post[None, :, y:y + 32, x:x + 32])[0]
                count[:, y:y + 32, x:x + 32] += 1
    assert torch.equal(predict_scene(model, pre, post, window=32), damage_map(total / count))


def test_damage_cli_end_to_end(tmp_path, bright):
    out = tmp_path / "damage.json"
    assert main(["damage", "--random", str(write_config(tmp_path)), "--data", str(bright), "--epochs", "1",
                 "--seeds", "2", "--crops-per-scene", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert len(result["summary"]["mIoU"]["values"]) == 2 and result["window"] == 32
    assert result["scenes"] == {"train": 3, "val": 1, "test": 1}


def damage_cli(tmp_path, root):
    return main(["damage", "--random", str(write_config(tmp_path)), "--data", str(root), "--epochs", "1",
                 "--seeds", "1"])


def test_a_label_raster_of_another_size_is_refused(tmp_path, bright, capsys):
    tifffile.imwrite(bright / "target" / "synthetic_00000_building_damage.tif", np.zeros((40, 48), np.uint8))
    assert damage_cli(tmp_path, bright) == 2
    err = capsys.readouterr().err
    assert "synthetic_00000_building_damage.tif: 40x48 pixels" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("raster, message", [
    (np.full((48, 48), 1.5, np.float32), "unknown label value 1.5"),
    (np.zeros((48, 48, 3), np.uint8), "a label raster has one band, this one has 3"),
])
def test_a_float_or_multi_band_label_raster_is_refused(tmp_path, bright, capsys, raster, message):
    tifffile.imwrite(bright / "target" / "synthetic_00002_building_damage.tif", raster)
    assert damage_cli(tmp_path, bright) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1


def test_nodata_pixels_reach_the_model_as_the_training_mean(bright):
    path = bright / "pre-event" / "synthetic_00000_pre_disaster.tif"
    image = tifffile.imread(path)
    image[:4, :4] = 0
    tifffile.imwrite(path, image, extratags=[(GDAL_NODATA, "s", 0, "0", True)])
    scenes = DamageScenes(bright, "train", {"opt": 3, "sar": 1})
    assert np.isnan(scenes.load(0)["opt"][:4, :4]).all()
    pre, post, _ = scenes.tensors(0, compute_stats(scenes, 8))
    assert torch.isfinite(pre).all() and torch.isfinite(post).all()
    assert torch.equal(pre[:, :4, :4], torch.zeros(3, 4, 4))


@pytest.mark.parametrize("folder", ["post-event", "target"])
def test_a_pre_image_without_its_post_image_or_target_is_refused(tmp_path, bright, capsys, folder):
    suffix = {"post-event": "post_disaster", "target": "building_damage"}[folder]
    (bright / folder / f"synthetic_00001_{suffix}.tif").unlink()
    assert damage_cli(tmp_path, bright) == 2
    err = capsys.readouterr().err
    assert f"no matching {folder} image" in err and "synthetic_00001" in err


def test_an_unknown_label_value_is_refused(tmp_path, bright, capsys):
    path = bright / "target" / "synthetic_00004_building_damage.tif"  # a test scene: refused before training
    target = tifffile.imread(path)
    target[0, 0] = 7
    tifffile.imwrite(path, target)
    assert damage_cli(tmp_path, bright) == 2
    assert "unknown label value 7" in capsys.readouterr().err


def test_a_bad_split_list_is_refused(tmp_path, bright, capsys):
    (bright / "val.txt").write_text("synthetic_00003\nno_such_scene\n")
    assert damage_cli(tmp_path, bright) == 2
    err = capsys.readouterr().err
    assert "val.txt" in err and "'no_such_scene' has no pre-event image" in err
    (bright / "val.txt").write_text("synthetic_00003\n")
    (bright / "test.txt").unlink()
    assert damage_cli(tmp_path, bright) == 2
    assert "no split list test.txt" in capsys.readouterr().err


def test_synth_scenes_task_and_bad_options(tmp_path, capsys):
    assert main(["synth", "--task", "scenes", "--out", str(tmp_path / "s"), "--n", "2", "--size", "32"]) == 0
    assert sorted(p.name for p in (tmp_path / "s" / "labels").iterdir()) == ["scene_00000.png", "scene_00001.png"]
    assert main(["synth", "--task", "damage", "--out", str(tmp_path / "d"), "--size", "8"]) == 2
    assert main(["synth", "--task", "damage", "--out", str(tmp_path / "d"), "--n", "2"]) == 2
    assert "the damage task needs at least 3 scenes" in capsys.readouterr().err
    assert main(["synth", "--task", "damage", "--out", str(tmp_path / "d"), "--n", "3", "--size", "32"]) == 0
    assert main(["damage", "--random", str(write_config(tmp_path)), "--data", str(tmp_path / "d"),
                 "--img-size", "40"]) == 2
    assert "--img-size 40: not a multiple of the encoder's patch size 16" in capsys.readouterr().err
