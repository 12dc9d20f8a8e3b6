"""Fine-tuning (layer-wise lr decay, protocol settings) and segmentation (pyramid maps, head, mIoU)."""

import json

import pytest
import torch
import yaml

from codemae.cli import main
from codemae.config import to_dict
from codemae.eval.finetune import PROTOCOLS, Classifier, layer_decay_groups
from codemae.eval.seg_heads import LightHead
from codemae.eval.segmentation import confusion, level_maps, miou_of
from codemae.methods import build_method

from conftest import tiny_config


def test_sar_target_protocol_matches_the_spec():
    p = PROTOCOLS["sar-target"]
    assert (p.epochs, p.warmup_epochs, p.batch_size, p.base_lr, p.weight_decay) == (60, 2, 50, 1e-3, 0.05)
    assert (p.layer_decay, p.drop_path, p.augment, p.centre_crop) == (0.85, 0.05, False, 128)


def test_layer_ids_and_decayed_learning_rates(tmp_path):
    method = build_method(tiny_config(tmp_path))  # HiViT with 2 attention blocks
    model = Classifier(method, ("sar",), 3)
    encoder = method.encoder
    # the published numbering: stage1 block, merge1, stage2 block, merge2, 2 attention blocks -> ids 1..6
    assert encoder.num_layers == 6
    assert encoder.layer_id("patch_embed.sar.proj.weight") == 0
    assert encoder.layer_id("stage1.0.mlp.fc1.weight") == 1
    assert encoder.layer_id("blocks.1.attn.qkv.weight") == 6
    assert encoder.layer_id("pyramid.block4.mlp.fc1.weight") == 6
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.5)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert scale_of[id(named["method.encoder.patch_embed.sar.proj.weight"])] == 0.5**6
    assert scale_of[id(named["method.encoder.blocks.0.attn.qkv.weight"])] == 0.5**1
    assert scale_of[id(named["head.weight"])] == 1.0
    decay_of = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay_of[id(named["head.bias"])] == 0.0 and decay_of[id(named["head.weight"])] == 0.05


def test_level_maps_invert_the_pyramid_layout():
    grid, s, c = 2, 2, 3
    image = torch.arange(c * 4 * 4, dtype=torch.float32).reshape(1, c, 4, 4)
    # the pyramid's layout: per patch (row-major), its s x s sub-tokens (row-major), then channels
    level = image.reshape(1, c, grid, s, grid, s).permute(0, 2, 4, 3, 5, 1).reshape(1, grid * grid, s * s * c)
    assert torch.equal(level_maps([level], [s], grid)[0], image)


def test_uper_head_shapes_and_miou_by_hand():
    head = LightHead([16, 8, 4], num_classes=3)
    out = head([torch.randn(2, 16, 2, 2), torch.randn(2, 8, 4, 4), torch.randn(2, 4, 8, 8)])
    assert out.shape == (2, 3, 8, 8)
    target = torch.tensor([[[0, 0, 1, 1]]])
    pred = torch.tensor([[[0, 1, 1, 1]]])
    # class 0: IoU 1/2, class 1: IoU 2/3 -> mean 58.33; class 2 absent everywhere: not counted
    assert miou_of(confusion(pred, target, 3, ignore=255)) == pytest.approx(100 * (0.5 + 2 / 3) / 2, rel=1e-5)
    ignored = torch.tensor([[[0, 255, 1, 1]]])
    assert miou_of(confusion(pred, ignored, 3, ignore=255)) == pytest.approx(100.0)
    # summed image by image = over all pixels at once (dataset-level, not a mean of per-image mIoUs)
    halves = confusion(pred[..., :2], target[..., :2], 3, 255) + confusion(pred[..., 2:], target[..., 2:], 3, 255)
    assert miou_of(halves) == miou_of(confusion(pred, target, 3, 255))


def test_finetune_and_segment_clis_on_synthetic(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))
    out = tmp_path / "ft.json"
    assert main(["finetune", "--random", str(config), "--data", "synthetic", "--synthetic-n", "60",
                 "--synthetic-size", "40", "--modality", "both", "--shots", "2", "--kshot", "random", "--seeds", "2", "--epochs", "2",
                 "--out", str(out)]) == 0
    values = json.loads(out.read_text())["summary"]["honest (val-selected, test once)"]["values"]
    assert len(values) == 2 and all(0 <= v <= 100 for v in values)
    out = tmp_path / "seg.json"
    assert main(["segment", "--random", str(config), "--synthetic-n", "12", "--iters", "1", "--seeds", "1",
                 "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert 0 < result["summary"]["mIoU"]["mean"] <= 100 and result["train_images"] == 6


def test_paired_folder_with_masks_for_probe_labels_and_segmentation(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from codemae.eval.data import paired_with_masks
    from conftest import write_pairs

    root = write_pairs(tmp_path / "pairs", n=8, size=32)
    (tmp_path / "masks").mkdir()
    for i in range(8):
        mask = np.zeros((32, 32), dtype=np.uint8)
        mask[:, : 4 * i] = 1                     # class 1 covers i/8 of the image
        mask[0, :] = 255                         # no data
        Image.fromarray(mask).save(tmp_path / "masks" / f"t{i}.png")
    data = paired_with_masks(root, tmp_path / "masks", {"opt": 3, "sar": 1}, nodata=255)
    assert data.multilabel and data.classes == ["0", "1"]
    # class 1 present once it covers >= 10% of the labelled pixels (i = 1 covers 1/8 = 12.5%)
    assert data.labels[:, 1].tolist() == [0, 1, 1, 1, 1, 1, 1, 1]
    assert data.labels[:, 0].tolist() == [1] * 8  # class 0 keeps >= 4 of 32 columns (12.5%)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))
    out = tmp_path / "seg.json"
    assert main(["segment", "--random", str(config), "--data", str(root), "--masks", str(tmp_path / "masks"),
                 "--nodata", "255", "--iters", "1", "--seeds", "1", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["classes"] == ["0", "1"]
    (tmp_path / "masks" / "t3.png").unlink()
    assert main(["segment", "--random", str(config), "--data", str(root), "--masks", str(tmp_path / "masks")]) == 2
    assert "no label raster for 't3'" in capsys.readouterr().err
