"""Segmentation as the papers run it: UperNet head and pyramids, poly schedule, layer decay, random
crops, sliding-window testing, training-only statistics, split lists and the CLI's bad-input answers."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from torch import nn

from codemae.cli import main
from codemae.config import to_dict
from codemae.eval.seg_heads import POOL_SCALES, UPerHead
from codemae.errors import DataError
from codemae.eval.segmentation import (Recipe, SegmentationData, Segmenter, channel_stats, choose_split, labelled,
                                       normalised, optimiser, predict_image, random_crops, run_segmentation,
                                       segmentation_loss, synthetic_segmentation, train_segmenter)
from codemae.methods import build_method
from codemae.train.optim import poly_lr_at

from conftest import shared_data, tiny_config, write_pairs

VIT = {"backbone": "vit_tiny", "embed_dim": 32, "num_heads": 2, "depth": 2}
CHANNELS = {"opt": 3, "sar": 1}


def hivit(tmp_path, **model):
    torch.manual_seed(0)
    return build_method(tiny_config(tmp_path, **({"model": model} if model else {}))).eval()


def vit(tmp_path):
    torch.manual_seed(0)
    return build_method(tiny_config(tmp_path, model=VIT)).eval()


def images(b=2, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"opt": torch.randn(b, 3, size, size, generator=g), "sar": torch.randn(b, 1, size, size, generator=g)}


def write_config(tmp_path, **sections):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run", **sections))))
    return str(path)


# -- schedule and optimiser --------------------------------------------------------------------------

def mmengine_chain(base, total, warmup, power=1.0, eta_min=0.0, start=1e-6):
    """The lr per iteration as mmengine's chainable LinearLR(begin 0, end warmup) + PolyLR(begin warmup,
    end total) step it (each spanning ``end - begin - 1`` steps), one update per iteration."""
    lrs, lr = [], base
    for it in range(total):
        if it < warmup:  # LinearLR: last_step = it, total_iters = warmup - 1
            k, n = it, warmup - 1
            lr = base * start if k == 0 else lr * (1 + (1 - start) / (n * start + (k - 1) * (1 - start)))
        elif it > warmup:  # PolyLR: last_step = it - warmup (0 keeps the lr), total_iters = total - warmup - 1
            k, n = it - warmup, total - warmup - 1
            lr = (lr - eta_min) * (1 - 1 / (n - k + 1)) ** power + eta_min
        lrs.append(lr)
    return lrs


def test_poly_schedule_is_exact_on_small_cases():
    assert [poly_lr_at(k, 1.0, 4) for k in range(4)] == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])  # last step at 0
    # warm-up 3 of 8: factor 1e-6, 1/2, 1 (mmengine reaches 1 at step 2), then poly over the last 5 steps
    expected = [1e-6, 1e-6 + (1 - 1e-6) / 2, 1.0, 1.0, 0.75, 0.5, 0.25, 0.0]
    assert [poly_lr_at(k, 1.0, 8, warmup_steps=3) for k in range(8)] == pytest.approx(expected)
    for total, warmup, power, eta_min in [(12, 2, 1.0, 0.0), (10, 0, 2.0, 0.01), (20, 5, 0.9, 1e-4), (6, 2, 1.0, 0.0)]:
        ours = [poly_lr_at(k, 0.1, total, power, eta_min, warmup) for k in range(total)]
        assert ours == pytest.approx(mmengine_chain(0.1, total, warmup, power, eta_min), rel=1e-9, abs=1e-12)


def test_training_follows_the_schedule_and_the_layer_decay(tmp_path):
    method = hivit(tmp_path)
    data = synthetic_segmentation(4, 32, 0, CHANNELS)
    data = normalised(data, channel_stats(data, np.arange(2)))
    recipe = Recipe(head="light", train_encoder=True, lr=0.01, iters=6, warmup_iters=2, power=2.0, min_lr=0.001,
                    batch_size=2, layer_decay=0.5)
    model = Segmenter(method, ("opt", "sar"), data.num_classes, True, "light")
    log = train_segmenter(model, data, np.arange(2), recipe, 32, seed=0)
    assert log["lr"] == [poly_lr_at(k, 0.01, 6, 2.0, 0.001, 2) for k in range(6)]
    groups = optimiser(model, recipe).param_groups
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    top = method.encoder.num_layers
    assert scale[id(named["method.encoder.patch_embed.opt.proj.weight"])] == 0.5 ** top
    assert scale[id(named["method.encoder.blocks.1.attn.qkv.weight"])] == 0.5 ** (top - method.encoder.layer_id(
        "blocks.1.attn.qkv.weight"))
    assert scale[id(named["head.classifier.weight"])] == 1.0
    frozen = Segmenter(hivit(tmp_path), ("opt",), 3, False, "light")
    kept = {id(p) for g in optimiser(frozen, recipe).param_groups for p in g["params"]}
    assert kept == {id(p) for p in frozen.head.parameters()}  # a frozen encoder is not in the optimiser


def test_a_few_training_steps_lower_the_loss(tmp_path):
    data = synthetic_segmentation(4, 32, 0, CHANNELS)
    data = normalised(data, channel_stats(data, np.arange(4)))
    for head in ("light", "upernet"):
        model = Segmenter(hivit(tmp_path), ("opt", "sar"), data.num_classes, False, head, channels=16, aux_head=True)
        recipe = Recipe(head=head, lr=1e-2, iters=25, warmup_iters=0, batch_size=4, aux_head=True)
        loss = train_segmenter(model, data, np.arange(4), recipe, 32, seed=0)["loss"]
        assert np.mean(loss[-5:]) < 0.9 * np.mean(loss[:5]), (head, loss)


def test_the_loss_adds_the_auxiliary_head_at_0_4():
    g = torch.Generator().manual_seed(0)
    main_, aux = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    target = torch.randint(3, (2, 4, 4), generator=g)
    target[0, 0, 0] = 255
    expected = F.cross_entropy(main_, target, ignore_index=255) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)
    assert torch.allclose(segmentation_loss({"main": main_, "aux": aux}, target, 255, 0.4), expected)
    assert torch.equal(segmentation_loss({"main": main_}, target, 255, 0.4),
                       F.cross_entropy(main_, target, ignore_index=255))


# -- heads and pyramids ------------------------------------------------------------------------------

def test_upernet_on_hivit_reads_strides_4_8_16_and_a_pooled_32(tmp_path):
    model = Segmenter(hivit(tmp_path), ("opt", "sar"), 5, False, "upernet", channels=16, aux_head=True).eval()
    x = images(size=64)  # grid 4: stride 16 -> 4 x 4
    maps = model.pyramid(x)
    pyramid_dim = model.method.encoder.level_dims[0]
    assert [tuple(m.shape) for m in maps] == [(2, 2 * pyramid_dim, s, s) for s in (16, 8, 4, 2)]
    assert torch.equal(maps[3], F.max_pool2d(maps[2], 2, 2))
    calls = []
    model.aux.register_forward_hook(lambda *_: calls.append(1))
    out = model.outputs(x)
    assert out["main"].shape == out["aux"].shape == (2, 5, 64, 64) and len(calls) == 1
    assert model(x).shape == (2, 5, 64, 64) and len(calls) == 1  # testing runs no auxiliary head
    wide = Segmenter(hivit(tmp_path), ("opt",), 5, False, "upernet", channels=520, aux_head=True)
    assert wide.aux[0][0].out_channels == 256 and model.aux[0][0].out_channels == 8  # mmseg's 256, or half


def test_upernet_on_vit_uses_the_simple_feature_pyramid(tmp_path):
    model = Segmenter(vit(tmp_path), ("sar",), 4, False, "upernet", channels=8).eval()
    maps = model.pyramid(images())
    assert [tuple(m.shape) for m in maps] == [(2, 32, s, s) for s in (8, 4, 2, 1)]
    assert model(images()).shape == (2, 4, 32, 32)


def test_uperhead_is_mmsegs_layout():
    head = UPerHead([4, 5, 6, 7], num_classes=3, channels=8).eval()
    assert [stage[0].output_size for stage in head.ppm.stages] == list(POOL_SCALES) == [1, 2, 3, 6]
    assert head.bottleneck[0].in_channels == 7 + 4 * 8 and head.bottleneck[0].kernel_size == (3, 3)
    assert [c[0].in_channels for c in head.lateral_convs] == [4, 5, 6]
    assert all(c[0].kernel_size == (1, 1) for c in head.lateral_convs)
    assert all(c[0].kernel_size == (3, 3) for c in head.fpn_convs) and len(head.fpn_convs) == 3
    assert head.fpn_bottleneck[0].in_channels == 4 * 8
    assert head.cls_seg[0].p == 0.1 and head.cls_seg[1].kernel_size == (1, 1)
    assert torch.all(head.cls_seg[1].bias == 0) and head.cls_seg[1].weight.std() < 0.05
    out = head([torch.randn(2, c, s, s) for c, s in zip([4, 5, 6, 7], [16, 8, 4, 2])])
    assert out.shape == (2, 3, 16, 16)


def test_a_frozen_encoder_stays_in_eval_mode_while_the_head_trains(tmp_path):
    frozen = Segmenter(hivit(tmp_path, drop_path=0.5), ("opt",), 3, False, "light").train()
    assert frozen.head.training and not frozen.method.training
    with torch.no_grad():
        assert torch.equal(frozen.pyramid(images())[0], frozen.pyramid(images())[0])  # no drop path
    segmentation_loss(frozen.outputs(images()), torch.zeros(2, 32, 32, dtype=torch.long), 255, 0.4).backward()
    assert all(p.grad is None for p in frozen.method.parameters())
    assert all(p.grad is not None for p in frozen.head.parameters())
    tuned = Segmenter(hivit(tmp_path, drop_path=0.5), ("opt",), 3, True, "light").train()
    assert tuned.method.training


# -- crops and sliding windows -----------------------------------------------------------------------

class Pointwise(nn.Module):
    """A 1x1-conv 'segmenter': its output at a pixel depends only on that pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 3, 1)

    def forward(self, images: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.conv(torch.cat([images["opt"], images["sar"]], 1))


def test_sliding_window_on_a_scene_equals_the_whole_image_for_a_pointwise_head():
    torch.manual_seed(0)
    model = Pointwise()
    scene = {m: x[0] for m, x in images(1, 40, seed=1).items()}
    scene = {m: F.pad(x, (0, 16)) for m, x in scene.items()}  # 40 x 56
    with torch.no_grad():
        whole = model({m: x[None] for m, x in scene.items()})[0]
    assert torch.allclose(predict_image(model, scene, ("opt", "sar"), 16, 8), whole, atol=1e-6)


def test_sliding_window_equals_a_manual_loop_over_windows(tmp_path):
    model = Segmenter(hivit(tmp_path), ("opt", "sar"), 3, False, "light").eval()
    scene = {m: x[0] for m, x in images(1, 48, seed=2).items()}
    total, count = torch.zeros(3, 48, 48), torch.zeros(1, 48, 48)
    with torch.no_grad():
        for y in (0, 16):
            for x in (0, 16):
                total[:, y:y + 32, x:x + 32] += model({m: v[None, :, y:y + 32, x:x + 32] for m, v in scene.items()})[0]
                count[:, y:y + 32, x:x + 32] += 1
    assert torch.allclose(predict_image(model, scene, ("opt", "sar"), 32, 16), total / count, atol=1e-5)


def test_random_crops_come_from_training_images_flipped_or_not_and_padded():
    base = torch.arange(6 * 8, dtype=torch.float32).reshape(1, 6, 8)
    data = SegmentationData([{"opt": base}, {"opt": -torch.ones(1, 6, 8)}],
                            [torch.zeros(6, 8, dtype=torch.long), torch.ones(6, 8, dtype=torch.long)], ["a", "b"],
                            ["0", "1"], 2)
    crops, masks = random_crops(data, np.array([0]), 4, 16, torch.Generator().manual_seed(0))
    assert crops["opt"].shape == (16, 1, 4, 4) and torch.all(masks == 0)  # never the other image
    windows = {tuple(base[0, y:y + 4, x:x + 4].flatten().tolist()) for y in range(3) for x in range(5)}
    windows |= {tuple(base[0, y:y + 4, x:x + 4].flip(-1).flatten().tolist()) for y in range(3) for x in range(5)}
    assert all(tuple(c.flatten().tolist()) in windows for c in crops["opt"])
    crops, masks = random_crops(data, np.array([1]), 7, 2, torch.Generator().manual_seed(0))
    assert crops["opt"].shape == (2, 1, 7, 7) and torch.all(masks[:, 6] == 255)  # the 7th row is padding
    assert torch.all(crops["opt"][:, :, 6] == 0)


# -- statistics and splits ---------------------------------------------------------------------------

def test_statistics_come_from_the_training_images_only(tmp_path):
    data = synthetic_segmentation(6, 32, 0, CHANNELS)
    train = np.array([0, 1, 2])
    stats = channel_stats(data, train)
    pixels = torch.cat([data.images[i]["opt"].flatten(1) for i in train], 1).double()
    assert torch.allclose(stats["opt"][0], pixels.mean(1).float()) and torch.allclose(stats["opt"][1], pixels.std(1).float())
    # test images changed beyond recognition: the statistics and the whole training run stay the same
    altered = SegmentationData([dict(s) if i in train else {m: 100 * x + 7 for m, x in s.items()}
                                for i, s in enumerate(data.images)], data.masks, data.names, data.classes,
                               data.num_classes)
    assert all(torch.equal(a, b) for m in stats for a, b in zip(stats[m], channel_stats(altered, train)[m]))
    split = {"train": train, "test": np.array([3, 4, 5])}
    recipe = Recipe(head="light", lr=1e-3, iters=3, warmup_iters=0, batch_size=2, crop=64, stride=48)
    load = lambda: hivit(tmp_path)  # noqa: E731
    first = run_segmentation(load, data, "both", recipe, [0], split)
    second = run_segmentation(load, altered, "both", recipe, [0], split)
    assert first["train_loss_per_seed"] == second["train_loss_per_seed"]
    assert (first["crop"], first["stride"]) == (32, 32)  # crop lowered to the 32-px images, the stride with it


def test_split_lists_are_honoured_exactly_and_the_fallback_says_so(tmp_path):
    data = synthetic_segmentation(6, 32, 0, CHANNELS)
    (tmp_path / "train.txt").write_text("scene5\n# a comment\nscene0\n\n")
    (tmp_path / "test.txt").write_text("scene2\nscene3\n")
    split, how = choose_split(data, {"train": str(tmp_path / "train.txt"), "test": str(tmp_path / "test.txt")}, 0.5)
    assert split["train"].tolist() == [5, 0] and split["test"].tolist() == [2, 3] and "given split lists" in how
    split, how = choose_split(data, {}, 0.5)
    assert split["train"].tolist() == [0, 1, 2] and split["test"].tolist() == [3, 4, 5] and "no split lists" in how


def write_masked_pairs(tmp_path, n=6):
    root = write_pairs(tmp_path / "pairs", n=n, size=32)
    (tmp_path / "masks").mkdir()
    for i in range(n):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, : 4 * i] = 1
        Image.fromarray(mask).save(tmp_path / "masks" / f"t{i}.png")
    return root


def test_cli_trains_on_the_listed_images_only(tmp_path, capsys):
    root = write_masked_pairs(tmp_path)
    (tmp_path / "train.txt").write_text("t4\nt5\n")
    (tmp_path / "test.txt").write_text("t0\nt1\nt2\n")
    (tmp_path / "val.txt").write_text("t3\n")
    out = tmp_path / "seg.json"
    args = ["segment", "--random", write_config(tmp_path), "--data", str(root), "--masks", str(tmp_path / "masks"),
            "--iters", "2", "--warmup-iters", "0", "--batch-size", "2", "--seeds", "1", "--lr", "1e-3"]
    assert main([*args, "--train", str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt"),
                 "--val", str(tmp_path / "val.txt"), "--out", str(out)]) == 0
    result = json.loads(out.read_text())  # the fallback would train on t0-t2 and test on t3-t5
    assert (result["train_images"], result["test_images"]) == (2, 3) and "given split lists" in result["split"]
    assert 0 <= result["summary"]["mIoU"]["mean"] <= 100 and 0 <= result["summary"]["val mIoU"]["mean"] <= 100
    assert "given split lists" in capsys.readouterr().out


@pytest.mark.parametrize("train, test, message", [
    ("t4\nghost\n", "t0\n", "'ghost' is not in --data"),
    ("t4\nt0\n", "t0\nt1\n", "names 't0', also in"),
    ("", "t0\n", "is empty"),
])
def test_bad_split_lists_exit_2_naming_the_list_and_name(tmp_path, capsys, train, test, message):
    root = write_masked_pairs(tmp_path)
    (tmp_path / "train.txt").write_text(train)
    (tmp_path / "test.txt").write_text(test)
    assert main(["segment", "--random", write_config(tmp_path), "--data", str(root), "--masks",
                 str(tmp_path / "masks"), "--train", str(tmp_path / "train.txt"), "--test",
                 str(tmp_path / "test.txt"), "--iters", "1"]) == 2
    err = capsys.readouterr().err
    assert message in err and ("train.txt" in err or "test.txt" in err)


@pytest.mark.parametrize("flags, message", [
    (["--crop", "40"], "--crop 40 is not a multiple of the encoder's patch size 16"),
    (["--layer-decay", "1.5"], "--layer-decay 1.5: expected in (0, 1]"),
    (["--warmup-iters", "5", "--iters", "5"], "--warmup-iters 5: expected below --iters 5"),
    (["--batch-size", "1"], "--batch-size 1: expected >= 2"),
    (["--crop", "32", "--stride", "48"], "--stride 48: expected at most --crop 32"),
    (["--data", "pairs"], "--data and --masks go together"),
    (["--scene", "o.tif", "s.tif", "m.tif", "--data", "d", "--masks", "m"], "either --scene or --data/--masks"),
    (["--train", "x.txt", "--test", "y.txt"], "split lists name the stems of --data/--masks"),
])
def test_bad_segment_options_exit_2(tmp_path, capsys, flags, message):
    assert main(["segment", "--random", write_config(tmp_path), "--synthetic-n", "4", "--iters", "1",
                 "--warmup-iters", "0", "--seeds", "1", *flags]) == 2
    assert message in capsys.readouterr().err


def test_a_negative_label_is_refused_naming_the_sample():
    masks = [torch.zeros(4, 4, dtype=torch.long), torch.full((4, 4), -9999, dtype=torch.long)]
    with pytest.raises(DataError, match="raster of 'b' holds label -9999.*--nodata -9999"):
        labelled([{"opt": torch.zeros(1, 4, 4)}] * 2, masks, ["a", "b"])


def test_a_label_raster_of_another_size_exits_2(tmp_path, capsys):
    root = write_masked_pairs(tmp_path)
    Image.fromarray(np.zeros((16, 16), dtype=np.uint8)).save(tmp_path / "masks" / "t2.png")
    assert main(["segment", "--random", write_config(tmp_path), "--data", str(root), "--masks",
                 str(tmp_path / "masks"), "--iters", "1"]) == 2
    assert "t2.png is 16x16 but its image 't2' is 32x32" in capsys.readouterr().err


@pytest.mark.slow
def test_flood_chip_light_and_upernet_heads(tmp_path):
    flood = shared_data("sen1floods11")
    scene = [str(flood / "S2/Spain_7370579_S2Hand.tif"), str(flood / "S1/Spain_7370579_S1Hand.tif"),
             str(flood / "Labels/Spain_7370579_LabelHand.tif")]
    config = write_config(tmp_path)
    for head in ("light", "upernet"):
        out = tmp_path / f"{head}.json"
        assert main(["segment", "--random", config, "--scene", *scene, "--opt-bands", "3", "2", "1", "--sar-bands",
                     "1", "--sar-db", "-30", "0", "--head", head, "--channels", "16", "--iters", "5",
                     "--warmup-iters", "1", "--batch-size", "2", "--crop", "64", "--lr", "1e-3", "--seeds", "1",
                     "--out", str(out)]) == 0
        result = json.loads(out.read_text())
        assert result["classes"] == ["0", "1"] and result["crop"] == 64 and result["stride"] == 32
        assert 0 < result["summary"]["mIoU"]["mean"] <= 100


def test_drop_path_reaches_the_encoder_only_when_it_is_fine_tuned(tmp_path, monkeypatch):
    import codemae.eval.features as features

    seen = []
    real = features.method_to_evaluate

    def spy(checkpoint, random_config=None, seed=0, drop_path=None):
        seen.append(drop_path)
        return real(checkpoint, random_config, seed, drop_path)

    monkeypatch.setattr(features, "method_to_evaluate", spy)
    args = ["segment", "--random", write_config(tmp_path), "--synthetic-n", "4", "--iters", "1", "--seeds", "1",
            "--batch-size", "2", "--drop-path", "0.2"]
    assert main([*args, "--finetune-encoder"]) == 0 and set(seen) == {0.2}
    seen.clear()
    assert main(args) == 0 and set(seen) == {None}  # frozen: the checkpoint's own rate, in eval mode anyway
