"""Object detection: VOC / COCO readers, box-following augmentations, the FPN adapter, the
schedule, the metric wrapper, training on CPU, bad input and (slow) the real SAR detection set."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from codemae.cli import main
from codemae.errors import DataError
from codemae.eval.detection import (Detector, DetectionRecipe, EncoderFPN, detection_metrics, lr_factor, predict,
                                    schedule, train_detector, training_targets)
from codemae.eval.detection_data import (DetectionImages, detection_sets, multiscale_sizes, train_transform,
                                         twin_split)
from codemae.eval.finetune import layer_decay_groups
from codemae.methods import build_method
from conftest import shared_data, tiny_config, write_config

SAR_KEY = "model.sar_channels"


def scene(w: int, h: int, boxes: list[tuple[float, float, float, float]], seed: int) -> np.ndarray:
    """Dark speckle with a bright rectangle per box."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 60, (h, w), dtype=np.uint8)
    for x0, y0, x1, y1 in boxes:
        img[int(max(y0, 0)):int(y1), int(max(x0, 0)):int(x1)] = 220
    return img


def write_voc(root: Path, images: dict[str, tuple[int, int, list[tuple]]], lists: dict[str, list[str]]) -> Path:
    """A VOC folder: images[id] = (width, height, [(name, (x0, y0, x1, y1), difficult)])."""
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, (w, h, objects) in images.items():
        Image.fromarray(scene(w, h, [o[1] for o in objects], len(image_id))).save(root / "JPEGImages" / f"{image_id}.png")
        objs = "".join(
            f"<object><name>{name}</name><difficult>{int(diff)}</difficult><bndbox><xmin>{b[0]}</xmin>"
            f"<ymin>{b[1]}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
            for name, b, diff in objects)
        (root / "Annotations" / f"{image_id}.xml").write_text(
            f"<annotation><filename>{image_id}.png</filename><size><width>{w}</width><height>{h}</height>"
            f"<depth>1</depth></size>{objs}</annotation>")
    for name, ids in lists.items():
        (root / "ImageSets" / "Main" / f"{name}.txt").write_text("\n".join(ids) + "\n")
    return root


def write_coco(root: Path, name: str, images: dict[str, tuple[int, int, list[tuple]]],
               categories: list[str]) -> Path:
    """A COCO JSON beside PNGs; objects (category, (x, y, w, h), iscrowd)."""
    root.mkdir(parents=True, exist_ok=True)
    coco = {"images": [], "annotations": [], "categories": [{"id": i + 1, "name": c} for i, c in enumerate(categories)]}
    for k, (file, (w, h, objects)) in enumerate(images.items()):
        xyxy = [(x, y, x + bw, y + bh) for _, (x, y, bw, bh), _ in objects]
        Image.fromarray(scene(w, h, xyxy, k)).save(root / file)
        coco["images"].append({"id": k, "file_name": file, "width": w, "height": h})
        for cat, box, crowd in objects:
            coco["annotations"].append({"id": len(coco["annotations"]), "image_id": k, "bbox": list(box),
                                        "category_id": categories.index(cat) + 1, "iscrowd": int(crowd)})
    path = root / name
    path.write_text(json.dumps(coco))
    return path


VOC_IMAGES = {
    "a": (40, 60, [("car", (3, 4, 20, 30), False), ("tank", (22.5, 31, 39, 58), True)]),
    "b": (64, 48, [("tank", (10, 5, 30, 25), False)]),
    "c": (64, 48, []),
}


def test_voc_reader_turns_1_based_corners_into_continuous_boxes(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", VOC_IMAGES, {"train": ["a", "c"], "test": ["b"]})
    train, test = detection_sets(str(root), "voc", "train", None, str(root / "ImageSets/Main/test.txt"), None)
    assert train.classes == ["car", "tank"]
    a, c = train.items
    np.testing.assert_array_equal(a.boxes, [[2, 3, 20, 30], [21.5, 30, 39, 58]])  # (xmin - 1, ymin - 1, xmax, ymax)
    assert a.names == ["car", "tank"] and a.ignore.tolist() == [False, True] and (a.width, a.height) == (40, 60)
    assert c.boxes.shape == (0, 4) and train.background_only == 1 and train.clipped_boxes == 0
    np.testing.assert_array_equal(test.items[0].boxes, [[9, 4, 30, 25]])
    assert not train.notes  # a test list was given: no split made


def test_coco_reader_converts_xywh_exactly(tmp_path: Path) -> None:
    images = {"p.png": (50, 40, [("ship", (1.5, 2, 10, 20), False), ("ship", (30, 10, 5, 5), True)]),
              "q.png": (50, 40, [("plane", (0, 0, 50, 40), False)])}
    ann = write_coco(tmp_path / "coco", "train.json", images, ["ship", "plane"])
    train, test = detection_sets(str(tmp_path / "coco"), "coco", None, str(ann), str(ann), None)
    assert train.classes == ["ship", "plane"]  # the categories' id order, not sorted names
    p, q = train.items
    np.testing.assert_array_equal(p.boxes, [[1.5, 2, 11.5, 22], [30, 10, 35, 15]])
    assert p.ignore.tolist() == [False, True]
    np.testing.assert_array_equal(q.boxes, [[0, 0, 50, 40]])
    assert train.labels(q, "q").tolist() == [1]


def test_box_past_the_edge_is_clipped_and_counted(tmp_path: Path) -> None:
    whole = ("y", (1, 1, 40, 30), False)  # VOC's whole image: pixels 1..W, 1..H, not clipped
    root = write_voc(tmp_path / "voc", {"a": (40, 30, [("x", (30, 20, 45, 33), False), whole])}, {"trainval": ["a"]})
    train, _ = detection_sets(str(root), "voc", None, str(root / "ImageSets/Main/trainval.txt"),
                              str(root / "ImageSets/Main/trainval.txt"), None)
    np.testing.assert_array_equal(train.items[0].boxes, [[29, 19, 40, 30], [0, 0, 40, 30]])
    assert train.clipped_boxes == 2  # the same image read as train and as test
    assert train.notes == ["warning: 1 test images (or their X_flip twins) are also in the training list"]


def test_resize_flip_and_multiscale_move_the_boxes(tmp_path: Path) -> None:
    root = write_voc(tmp_path / "voc", {"a": (40, 60, [("car", (4, 6, 20, 30), False)])}, {"trainval": ["a"]})
    train, _ = detection_sets(str(root), "voc", None, None, str(root / "ImageSets/Main/trainval.txt"), None)
    plain = DetectionImages(train, 32, 1, SAR_KEY)
    image, target = plain[0]
    assert image.shape == (1, 32, 32)
    torch.testing.assert_close(target["boxes"].as_subclass(torch.Tensor),
                               torch.tensor([[3 * 32 / 40, 5 * 32 / 60, 20 * 32 / 40, 30 * 32 / 60]]))
    flipped = DetectionImages(train, 32, 3, SAR_KEY, transform=v2.RandomHorizontalFlip(1.0))
    fimage, ftarget = flipped[0]
    assert fimage.shape == (3, 32, 32)  # single-band SAR replicated for a 3-channel SAR embedding
    torch.testing.assert_close(fimage[0], image[0].flip(-1))
    x0, y0, x1, y1 = target["boxes"][0].tolist()
    torch.testing.assert_close(ftarget["boxes"].as_subclass(torch.Tensor), torch.tensor([[32 - x1, y0, 32 - x0, y1]]))
    torch.manual_seed(0)
    scaled = DetectionImages(train, 32, 1, SAR_KEY, transform=train_transform([64]))
    simage, starget = scaled[0]
    assert simage.shape == (1, 64, 64)
    box = starget["boxes"][0].tolist()
    assert any(box == pytest.approx([2 * v for v in c], abs=1e-4) for c in ((x0, y0, x1, y1), (32 - x1, y0, 32 - x0, y1)))
    assert multiscale_sizes(256) == [192, 224, 256, 288, 320]
    two = DetectionImages(train, 32, 3, SAR_KEY)
    two.images.append(torch.rand(3, 16, 16))  # statistics over every pixel of images of any size
    flat = torch.cat([im.flatten(1) for im in two.images], 1).double()
    mean, std = two.channel_stats()
    np.testing.assert_allclose(mean, flat.mean(1), rtol=1e-9)
    np.testing.assert_allclose(std, flat.std(1), rtol=1e-6)


def test_split_is_seeded_and_keeps_flip_twins_together() -> None:
    stems = ["a", "a_flip", "b", "c", "c_flip", "d", "e", "f", "g", "h"]
    train, test = twin_split(stems, 0.25, seed=3)
    again = twin_split(stems, 0.25, seed=3)
    assert train.tolist() == again[0].tolist() and test.tolist() == again[1].tolist()
    assert sorted(train.tolist() + test.tolist()) == list(range(len(stems)))
    assert len(test) in (2, 3, 4)  # 2 of the 8 groups, twins counting double
    for side in (train, test):
        names = {stems[i] for i in side}
        assert ("a" in names) == ("a_flip" in names) and ("c" in names) == ("c_flip" in names)
    train, test = twin_split(["a", "a_flip", "b"], 0.2, seed=0)  # round(0.2 x 2 groups) = 0, yet one is held out
    assert len(train) and len(test)
    with pytest.raises(DataError, match="too few to split"):
        twin_split(["a", "a_flip"], 0.2, seed=0)


def test_schedules_and_lr_factor() -> None:
    assert schedule("1x") == (12, (8, 11)) and schedule("3x") == (36, (27, 33))
    assert schedule("1x", 6) == (6, (4, 6)) and schedule("3x", 12) == (12, (9, 11))
    recipe = DetectionRecipe(epochs=3, milestones=(1, 2), warmup_iters=4, warmup_start=0.2)
    factors = [lr_factor(s, 10, recipe) for s in (0, 2, 4, 9, 10, 19, 20, 29)]
    np.testing.assert_allclose(factors, [0.2, 0.6, 1.0, 1.0, 0.1, 0.1, 0.01, 0.01])
    short = DetectionRecipe(warmup_iters=500, warmup_start=0.0)  # warm-up capped at one epoch of 5 steps
    assert lr_factor(1, 5, short) == pytest.approx(0.2) and lr_factor(5, 5, short) == 1.0


def test_map_of_perfect_predictions_is_100_and_of_none_0() -> None:
    targets = [{"boxes": torch.tensor([[0., 0, 10, 10], [20, 20, 40, 30]]), "labels": torch.tensor([0, 1]),
                "iscrowd": torch.tensor([0, 0])},
               {"boxes": torch.tensor([[5., 5, 15, 25]]), "labels": torch.tensor([1]), "iscrowd": torch.tensor([0])}]
    perfect = [{"boxes": t["boxes"], "scores": torch.ones(len(t["labels"])), "labels": t["labels"]} for t in targets]
    none = [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
            for _ in targets]
    good = detection_metrics(perfect, targets, ["car", "tank"])
    assert good == {"mAP50": 100.0, "mAP50:95": 100.0, "AP50 car": 100.0, "AP50 tank": 100.0}
    bad = detection_metrics(none, targets, ["car", "tank"])
    assert bad == {"mAP50": 0.0, "mAP50:95": 0.0, "AP50 car": 0.0, "AP50 tank": 0.0}
    crowd = [dict(targets[0]), targets[1]]  # a detection on an ignored (difficult / crowd) box costs nothing
    crowd[0]["boxes"] = torch.cat([targets[0]["boxes"], torch.tensor([[50., 50, 60, 60]])])
    crowd[0]["labels"], crowd[0]["iscrowd"] = torch.tensor([0, 1, 0]), torch.tensor([0, 0, 1])
    extra = [dict(perfect[0]), perfect[1]]
    extra[0]["boxes"] = crowd[0]["boxes"]
    extra[0]["labels"], extra[0]["scores"] = crowd[0]["labels"], torch.tensor([1.0, 1.0, 0.9])
    assert detection_metrics(extra, crowd, ["car", "tank"]) == good
    assert training_targets(crowd, torch.device("cpu"))[0]["labels"].tolist() == [1, 2]  # ignored dropped, +1
    half = [perfect[0], none[1]]  # the second image's tank missed: tank AP50 = recall 1/2 at precision 1
    assert detection_metrics(half, targets, ["car", "tank"])["AP50 tank"] == pytest.approx(50.5, abs=0.6)


class FixedDetections(torch.nn.Module):
    """Stands in for a Detector in evaluation: one box of torchvision label 1 (the first class) per image."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, images: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        return [{"boxes": torch.tensor([[1.0, 2, 9, 12]]), "scores": torch.tensor([0.9]), "labels": torch.tensor([1])}
                for _ in images]


def test_predict_shifts_labels_back_past_background() -> None:
    data = [(torch.rand(1, 16, 16), {}) for _ in range(3)]
    preds = predict(FixedDetections(), data, batch_size=2)
    assert len(preds) == 3 and all(p["labels"].tolist() == [0] for p in preds)
    targets = [{"boxes": torch.tensor([[1.0, 2, 9, 12]]), "labels": torch.tensor([0]), "iscrowd": torch.tensor([0])}] * 3
    assert detection_metrics(preds, targets, ["car"])["AP50 car"] == 100.0


def tiny_method(backbone: str):
    torch.manual_seed(0)
    cfg = tiny_config(Path("unused"), model={"backbone": backbone, "img_size": 32, "embed_dim": 32, "depth": 2,
                                             "num_heads": 2, "drop_path": 0.1})
    return build_method(cfg)


@pytest.mark.parametrize("backbone", ["hivit_tiny", "vit_tiny"])
def test_fpn_gives_strides_4_to_32(backbone: str) -> None:
    fpn = EncoderFPN(tiny_method(backbone), "sar", width=16)
    maps = fpn(torch.rand(2, 1, 64, 64))
    assert [tuple(m.shape) for m in maps.values()] == [(2, 16, 16, 16), (2, 16, 8, 8), (2, 16, 4, 4), (2, 16, 2, 2)]


def test_layer_decay_reaches_the_detector_encoder() -> None:
    method = tiny_method("hivit_tiny")
    model = Detector(method, "sar", 2, 64, [0.5], [0.2], DetectionRecipe(fpn_width=16, rois_per_image=16))
    groups = layer_decay_groups(model, 1.0, 0.05, 0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    encoder = method.encoder
    top = encoder.num_layers
    for name in ("patch_embed.sar.proj.weight", "blocks.0.attn.qkv.weight"):
        layer = encoder.layer_id(name)
        assert layer < top and scale[id(encoder.get_parameter(name))] == 0.5 ** (top - layer)
    assert scale[id(model.rcnn.roi_heads.box_predictor.cls_score.weight)] == 1.0
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable >= {id(p) for p in encoder.parameters()}
    assert not any(p.requires_grad for n, p in method.named_parameters() if not n.startswith("encoder."))


def test_detector_normalises_once_and_neither_resizes_nor_rescales_boxes() -> None:
    model = Detector(tiny_method("vit_tiny"), "sar", 2, 64, [0.5], [0.25],
                     DetectionRecipe(fpn_width=16, box_head="2fc", rois_per_image=16)).eval()
    x = torch.rand(1, 48, 48)  # smaller than the detector's size 64: GeneralizedRCNNTransform would upscale it
    batch, _ = model.rcnn.transform([x])
    assert batch.image_sizes == [(48, 48)] and batch.tensors.shape == (1, 1, 64, 64)  # padded to a multiple of 32
    torch.testing.assert_close(batch.tensors[0, :, :48, :48], (x - 0.5) / 0.25)
    assert not batch.tensors[0, :, 48:].any() and not batch.tensors[0, :, :, 48:].any()
    boxes = torch.tensor([[4.0, 6.0, 20.0, 30.0]])
    out = model.rcnn.transform.postprocess([{"boxes": boxes}], batch.image_sizes, [(48, 48)])
    torch.testing.assert_close(out[0]["boxes"], boxes)


def square_voc(root: Path, n: int, size: int = 64) -> Path:
    images = {f"s{i}": (size, size, [("t", (8 + 4 * i, 10, 30 + 4 * i, 34), False),
                                     ("u", (36, 38, 60, 60 - i), False)]) for i in range(n)}
    return write_voc(root, images, {"trainval": list(images)})


@pytest.mark.parametrize("backbone", ["hivit_tiny", "vit_tiny"])
def test_detector_trains_and_its_loss_falls(tmp_path: Path, backbone: str) -> None:
    root = square_voc(tmp_path / "voc", 2)
    train, _ = detection_sets(str(root), "voc", None, None, str(root / "ImageSets/Main/trainval.txt"), None)
    data = DetectionImages(train, 64, 1, SAR_KEY)
    recipe = DetectionRecipe(epochs=12, milestones=(12,), batch_size=2, base_lr=8e-3, warmup_iters=1,
                             fpn_width=16, box_head="2fc", rois_per_image=32)
    mean, std = data.channel_stats()
    model = Detector(tiny_method(backbone), "sar", len(train.classes), 64, mean, std, recipe)
    losses = train_detector(model, data, recipe, seed=0)
    assert len(losses) == 12 and all(np.isfinite(losses))
    assert np.mean(losses[-3:]) < 0.7 * np.mean(losses[:3])


def run_detect(tmp_path: Path, root: Path, *extra: str) -> int:
    config = write_config(tmp_path / "tiny.yaml")
    return main(["detect", "--random", str(config), "--data", str(root), "--modality", "sar", "--img-size", "64",
                 "--epochs", "1", "--seeds", "1", "--batch-size", "2", "--fpn-width", "16", "--box-head", "2fc",
                 "--rois-per-image", "16", *extra])


def test_cli_end_to_end_reports_and_counts_background(tmp_path: Path, capsys) -> None:
    root = square_voc(tmp_path / "voc", 5)
    empty = write_voc(root, {"bg": (64, 64, [])}, {})
    (root / "ImageSets/Main/trainval.txt").write_text("s0\ns1\ns2\ns3\ns4\nbg\n")
    out = tmp_path / "det.json"
    assert empty == root
    assert run_detect(tmp_path, root, "--out", str(out)) == 0
    printed = capsys.readouterr().out
    assert "no test list: a fixed split (seed 0)" in printed and "background-only" in printed
    result = json.loads(out.read_text())
    assert set(result["summary"]) >= {"mAP50", "mAP50:95"} and result["classes"] == ["t", "u"]
    assert result["train_images"] + result["test_images"] == 6


def test_cli_coco_with_multiscale_training(tmp_path: Path) -> None:
    images = {f"p{i}.png": (96, 80, [("ship", (5 + 3 * i, 6, 30, 30), False), ("plane", (50, 40, 30, 25), False)])
              for i in range(4)}
    train = write_coco(tmp_path / "coco", "train.json", images, ["ship", "plane"])
    test = write_coco(tmp_path / "coco", "test.json", dict(list(images.items())[:2]), ["ship", "plane"])
    out = tmp_path / "det.json"
    code = run_detect(tmp_path, tmp_path / "coco", "--format", "coco", "--train", str(train), "--test", str(test),
                      "--multiscale", "--img-size", "96", "--out", str(out))  # sizes 64, 96, 128 in one batch
    assert code == 0
    result = json.loads(out.read_text())
    assert result["classes"] == ["ship", "plane"] and (result["train_images"], result["test_images"]) == (4, 2)
    assert result["split"] == ["warning: 2 test images (or their X_flip twins) are also in the training list"]


@pytest.mark.parametrize("case, message", [
    ("outside", "lies outside the 64x64 image"),
    ("no_image", "which does not exist"),
    ("unknown_class", "class 'zebra' is not one of the classes"),
    ("not_in_classes", "class 'u' is not one of the classes (t)"),
    ("no_area", "has no area"),
    ("test_without_boxes", "the test images have no boxes"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys, case: str, message: str) -> None:
    root = square_voc(tmp_path / "voc", 2)
    extra: list[str] = []
    if case == "outside":
        write_voc(root, {"s1": (64, 64, [("t", (70, 5, 90, 20), False)])}, {})
    elif case == "no_image":
        (root / "JPEGImages" / "s1.png").unlink()
    elif case == "unknown_class":
        write_voc(root, {"z": (64, 64, [("zebra", (1, 1, 9, 9), False)])}, {})
        (tmp_path / "test.txt").write_text("z\n")
        extra = ["--test", str(tmp_path / "test.txt")]
    elif case == "not_in_classes":
        extra = ["--classes", "t"]
    elif case == "no_area":
        write_voc(root, {"s1": (64, 64, [("t", (30, 5, 20, 20), False)])}, {})
    elif case == "test_without_boxes":
        write_voc(root, {"bg": (64, 64, [])}, {})
        (tmp_path / "test.txt").write_text("bg\n")
        extra = ["--test", str(tmp_path / "test.txt")]
    assert run_detect(tmp_path, root, *extra) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("codemae: error: ") and message in err and "\n" not in err


def test_coco_annotation_naming_a_missing_image_is_exit_2(tmp_path: Path, capsys) -> None:
    ann = write_coco(tmp_path / "coco", "train.json", {"p.png": (64, 64, [("ship", (1, 2, 10, 20), False)])}, ["ship"])
    raw = json.loads(ann.read_text())
    raw["annotations"].append({"id": 9, "image_id": 42, "bbox": [1, 1, 5, 5], "category_id": 1})
    ann.write_text(json.dumps(raw))
    assert run_detect(tmp_path, tmp_path / "coco", "--format", "coco", "--train", str(ann)) == 2
    assert "names image id 42, which is not in 'images'" in capsys.readouterr().err
    raw["annotations"] = [{"id": 3, "image_id": 0, "bbox": [1, 2, 10], "category_id": 1}]
    ann.write_text(json.dumps(raw))
    assert run_detect(tmp_path, tmp_path / "coco", "--format", "coco", "--train", str(ann)) == 2
    assert "annotation 3 has bbox [1.0, 2.0, 10.0], not [x, y, width, height]" in capsys.readouterr().err
    del raw["annotations"][0]["image_id"]
    ann.write_text(json.dumps(raw))
    assert run_detect(tmp_path, tmp_path / "coco", "--format", "coco", "--train", str(ann)) == 2
    assert "a malformed COCO entry (KeyError: 'image_id')" in capsys.readouterr().err


@pytest.mark.slow
def test_detect_on_real_sar_detection_subset(tmp_path: Path) -> None:
    root = shared_data("sar_detection")
    ids = (root / "ImageSets/Main/trainval.txt").read_text().split()
    (tmp_path / "train.txt").write_text("\n".join(ids[:24]) + "\n")
    (tmp_path / "test.txt").write_text("\n".join(ids[-8:]) + "\n")
    out = tmp_path / "det.json"
    code = main(["detect", "--random", str(write_config(tmp_path / "tiny.yaml")), "--data", str(root),
                 "--modality", "sar", "--train", str(tmp_path / "train.txt"), "--test", str(tmp_path / "test.txt"),
                 "--img-size", "128", "--epochs", "1", "--seeds", "1", "--batch-size", "4", "--fpn-width", "32",
                 "--box-head", "2fc", "--rois-per-image", "64", "--out", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert result["train_images"] == 24 and result["test_images"] == 8
    assert 0.0 <= result["summary"]["mAP50"]["mean"] <= 100.0
