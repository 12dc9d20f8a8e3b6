"""Object-detection data: Pascal VOC and COCO readers, a fixed split, and a dataset of images with boxes.

Boxes are absolute continuous pixel ``xyxy`` in the image's own frame: VOC corners are 1-based
inclusive pixel indices, so ``(xmin, ymin, xmax, ymax)`` becomes ``(xmin - 1, ymin - 1, xmax, ymax)``
(detectron2's reading; ``xmin = 1, xmax = W`` covers the whole width); COCO ``xywh`` is already
continuous and becomes ``(x, y, x + w, y + h)``. VOC ``difficult`` objects and COCO
``iscrowd`` ones are kept as *ignored* boxes: not trained on, and ignored by the COCO-style
evaluator (a detection on them neither counts nor costs). A box that reaches past the image
edge (common in real VOC sets: sar_detection has 120 of 1,099) is clipped to the image and
counted; a box that does not overlap the image at all, or is inverted, is an error.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torchvision import tv_tensors
from torchvision.transforms import v2

from codemae.config import ScalingConfig
from codemae.data.readers import load_unit_image, read_header
from codemae.data.stats import image_channel_stats
from codemae.errors import ConfigError, DataError

FLIP_SUFFIX = "_flip"  # flipped twins of an image (X and X_flip) stay on the same side of a split
MULTISCALE = (0.75, 0.875, 1.0, 1.125, 1.25)


@dataclass
class ImageBoxes:
    """One image's annotation: ``boxes`` (N, 4) xyxy pixels, class names, and which are ignored."""

    image: Path
    width: int
    height: int
    boxes: np.ndarray
    names: list[str]
    ignore: np.ndarray


@dataclass
class DetectionSet:
    """Annotated images with class names indexed 0..K-1, and what reading them found."""

    items: list[ImageBoxes]
    classes: list[str]
    clipped_boxes: int = 0
    background_only: int = 0
    notes: list[str] = field(default_factory=list)

    def labels(self, item: ImageBoxes, where: str) -> np.ndarray:
        """``item``'s class indices; a name outside the classes is a :class:`DataError` naming ``where``."""
        unknown = sorted(set(item.names) - set(self.classes))
        if unknown:
            raise DataError(f"{where}: class '{unknown[0]}' is not one of the classes ({', '.join(self.classes)})")
        return np.array([self.classes.index(n) for n in item.names], dtype=np.int64)


def checked_box(box: list[float], width: int, height: int, where: str,
                written: list[float] | None = None) -> tuple[np.ndarray, bool]:
    """``box`` (continuous xyxy) clipped to the image, and whether clipping changed it; an inverted box
    or one that lies outside the image is a :class:`DataError` naming ``where`` and the box as
    ``written`` in the file (default ``box``)."""
    x0, y0, x1, y1 = box
    shown = written or box
    if not (x1 > x0 and y1 > y0):
        raise DataError(f"{where}: box {shown} has no area (its max corner is not past its min corner)")
    clipped = np.array([max(x0, 0), max(y0, 0), min(x1, width), min(y1, height)], dtype=np.float64)
    if not (clipped[2] > clipped[0] and clipped[3] > clipped[1]):
        raise DataError(f"{where}: box {shown} lies outside the {width}x{height} image")
    return clipped, bool((clipped != np.asarray(box, dtype=np.float64)).any())


def image_size(path: Path, where: str) -> tuple[int, int]:
    if not path.is_file():
        raise DataError(f"{where}: names image {path}, which does not exist")
    header = read_header(path)
    return header.width, header.height


def read_list(path: Path) -> list[str]:
    if not path.is_file():
        raise DataError(f"{path}: image list not found")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


def voc_list(root: Path, split: str | None, listing: str | None) -> list[str]:
    """Image ids of a VOC split: ``ImageSets/Main/<split>.txt``, or the list file ``listing``."""
    return read_list(Path(listing) if listing else root / "ImageSets" / "Main" / f"{split}.txt")


def read_voc(root: str | Path, ids: list[str]) -> tuple[list[ImageBoxes], int]:
    """The ``Annotations/<id>.xml`` of ``ids`` with their ``JPEGImages`` files; (items, clipped boxes)."""
    root = Path(root)
    items, clipped = [], 0
    for image_id in ids:
        xml = root / "Annotations" / f"{image_id}.xml"
        if not xml.is_file():
            raise DataError(f"{xml}: no annotation for image '{image_id}' of the image list")
        try:
            tree = ET.parse(xml).getroot()
        except ET.ParseError as err:
            raise DataError(f"{xml}: not valid XML ({err})") from err
        filename = tree.findtext("filename") or f"{image_id}.jpg"
        path = root / "JPEGImages" / filename
        width, height = image_size(path, str(xml))
        boxes, names, ignore = [], [], []
        for obj in tree.iter("object"):
            try:
                raw = [float(obj.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")]
            except (TypeError, ValueError) as err:
                raise DataError(f"{xml}: an object without a numeric bndbox xmin/ymin/xmax/ymax") from err
            x0, y0, x1, y1 = raw  # 1-based inclusive pixel indices -> continuous corners
            box, changed = checked_box([x0 - 1, y0 - 1, x1, y1], width, height, str(xml), raw)
            clipped += changed
            boxes.append(box)
            names.append((obj.findtext("name") or "").strip())
            ignore.append(obj.findtext("difficult", "0").strip() == "1")
        items.append(ImageBoxes(path, width, height, np.array(boxes).reshape(-1, 4), names, np.array(ignore, bool)))
    return items, clipped


def read_coco(annotations: str | Path, images: str | Path) -> tuple[list[ImageBoxes], list[str], int]:
    """A COCO JSON (``images``, ``annotations`` with ``bbox`` xywh, ``categories``) whose ``file_name``s
    lie under the folder ``images``; (items, category names in id order, clipped boxes)."""
    path = Path(annotations)
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not a readable COCO JSON file ({err})") from err
    missing = [k for k in ("images", "annotations", "categories") if k not in raw]
    if missing:
        raise DataError(f"{path}: no '{missing[0]}' list (not a COCO detection file)")
    try:
        categories = {c["id"]: str(c["name"]) for c in raw["categories"]}
        files = {im["id"]: str(im["file_name"]) for im in raw["images"]}
        anns = [(a.get("id"), a["image_id"], a["category_id"], [float(v) for v in a["bbox"]],
                 bool(a.get("iscrowd", 0))) for a in raw["annotations"]]
    except (KeyError, TypeError, ValueError, AttributeError) as err:
        raise DataError(f"{path}: a malformed COCO entry ({type(err).__name__}: {err})") from err
    per_image: dict[int, list[tuple]] = {k: [] for k in files}
    for ann_id, image_id, category, bbox, crowd in anns:
        if image_id not in per_image:
            raise DataError(f"{path}: annotation {ann_id} names image id {image_id}, which is not in 'images'")
        if category not in categories:
            raise DataError(f"{path}: annotation {ann_id} has category id {category}, which is not in 'categories'")
        if len(bbox) != 4:
            raise DataError(f"{path}: annotation {ann_id} has bbox {bbox}, not [x, y, width, height]")
        per_image[image_id].append((ann_id, category, bbox, crowd))
    items, clipped = [], 0
    for image_id, name in files.items():
        file = Path(images) / name
        width, height = image_size(file, f"{path} (image id {image_id})")
        boxes, names, ignore = [], [], []
        for ann_id, category, (x, y, w, h), crowd in per_image[image_id]:
            box, changed = checked_box([x, y, x + w, y + h], width, height, f"{path} (annotation {ann_id})")
            clipped += changed
            boxes.append(box)
            names.append(categories[category])
            ignore.append(crowd)
        items.append(ImageBoxes(file, width, height, np.array(boxes).reshape(-1, 4), names, np.array(ignore, bool)))
    return items, [categories[k] for k in sorted(categories)], clipped


def twin(image: Path) -> str:
    """The group of an image file: its stem without ``FLIP_SUFFIX``, in its folder."""
    return str(image.with_name(image.stem.removesuffix(FLIP_SUFFIX)))


def twin_split(stems: list[str], test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded split of image indices into (train, test) by group, ``X`` and ``X_flip`` in one group."""
    groups: dict[str, list[int]] = {}
    for i, stem in enumerate(stems):
        groups.setdefault(stem.removesuffix(FLIP_SUFFIX), []).append(i)
    keys = sorted(groups)
    if len(keys) < 2:
        raise DataError(f"{len(stems)} training image(s): too few to split off a test set; give --test")
    order = np.random.default_rng(seed).permutation(len(keys))
    n_test = min(max(int(round(test_fraction * len(keys))), 1), len(keys) - 1)  # neither side empty
    test = sorted(i for k in order[:n_test] for i in groups[keys[k]])
    train = sorted(i for k in order[n_test:] for i in groups[keys[k]])
    return np.array(train, dtype=np.int64), np.array(test, dtype=np.int64)


def detection_sets(data: str, fmt: str, train_split: str | None, train: str | None, test: str | None,
                   classes: list[str] | None, test_fraction: float = 0.2, split_seed: int = 0
                   ) -> tuple[DetectionSet, DetectionSet]:
    """(train, test) sets of a VOC folder or a COCO image folder. Without a test list, a fixed seeded
    ``test_fraction`` of the training list is held out (twins together); a given test list that shares
    images (or twins) with the training list is noted. Classes: ``classes`` if given,
    else the COCO categories, else the training set's names sorted; a name outside them is an error."""
    root = Path(data)
    if not root.is_dir():
        raise DataError(f"--data {data}: not a folder")
    notes = []
    if fmt == "voc":
        known = None
        train_items, clipped = read_voc(root, voc_list(root, train_split or "trainval", train))
        test_items, more = read_voc(root, read_list(Path(test))) if test else (None, 0)
    elif fmt == "coco":
        if not train or train_split:
            raise ConfigError("--format coco needs --train ANNOTATIONS.json, not --train-split "
                              "(and --test, or a split is made)")
        train_items, known, clipped = read_coco(train, root)
        test_items, _, more = read_coco(test, root) if test else (None, None, 0)
    else:
        raise ConfigError(f"--format {fmt}: choose voc or coco")
    clipped += more
    if test_items is not None:
        seen = {twin(it.image) for it in train_items}
        shared = sum(twin(it.image) in seen for it in test_items)
        if shared:
            notes.append(f"warning: {shared} test images (or their X{FLIP_SUFFIX} twins) are also in the training list")
    else:
        tr, te = twin_split([it.image.stem for it in train_items], test_fraction, split_seed)
        test_items, train_items = [train_items[i] for i in te], [train_items[i] for i in tr]
        notes.append(f"no test list: a fixed split (seed {split_seed}) of the training list, "
                     f"{len(train_items)} train / {len(test_items)} test images, X and X{FLIP_SUFFIX} twins together")
    names = classes or known or sorted({n for it in train_items for n in it.names})
    sets = []
    for side, items in (("training", train_items), ("test", test_items)):
        s = DetectionSet(items, list(names), notes=notes)
        for it in items:
            s.labels(it, str(it.image))  # unknown class names fail here, before any training
        s.background_only = sum(len(it.names) == 0 for it in items)
        if not any((~it.ignore).any() for it in items):
            raise DataError(f"the {side} images have no boxes (other than difficult / crowd ones)")
        sets.append(s)
    sets[0].clipped_boxes = clipped
    return sets[0], sets[1]


class DetectionImages(torch.utils.data.Dataset):
    """Images of a :class:`DetectionSet` decoded once, scaled to [0, 1], matched to the encoder's
    ``channels`` (single-band SAR replicated if the embedding is 3-channel) and resized to a
    ``size`` x ``size`` square with their boxes (nodata pixels set to 0); ``transform`` (transforms v2)
    runs per access."""

    def __init__(self, data: DetectionSet, size: int, channels: int, key: str,
                 scaling: ScalingConfig | None = None, transform: v2.Transform | None = None) -> None:
        self.data, self.transform = data, transform
        resize = v2.Resize((size, size), antialias=True)
        self.images, self.targets = [], []
        for item in data.items:
            unit = load_unit_image(item.image, scaling or ScalingConfig(), channels, key)
            image = torch.from_numpy(np.nan_to_num(unit, nan=0.0))  # nodata pixels (NaN) read as 0
            boxes = tv_tensors.BoundingBoxes(torch.from_numpy(item.boxes).float(), format="XYXY",
                                             canvas_size=(item.height, item.width))
            image, boxes = resize(tv_tensors.Image(image.permute(2, 0, 1)), boxes)
            self.images.append(image)
            self.targets.append({"boxes": boxes, "labels": torch.from_numpy(data.labels(item, str(item.image))),
                                 "iscrowd": torch.from_numpy(item.ignore).long()})

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[Tensor, dict[str, Tensor]]:
        image, target = self.images[i], dict(self.targets[i])
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std over every pixel of these images (the training-set normalisation)."""
        mean, std = image_channel_stats(self.images)
        return mean.tolist(), std.tolist()


def multiscale_sizes(size: int) -> list[int]:
    """Training sizes for multi-scale training: ``MULTISCALE`` x ``size``, rounded to multiples of 32."""
    return sorted({max(32, round(size * f / 32) * 32) for f in MULTISCALE})


def train_transform(scales: list[int] | None) -> v2.Transform:
    """Horizontal flip and, with ``scales``, a square resize to one of them; boxes follow the image."""
    steps: list[v2.Transform] = [v2.RandomHorizontalFlip(0.5)]
    if scales:
        steps.append(v2.RandomChoice([v2.Resize((s, s), antialias=True) for s in scales]))
    return v2.Compose(steps)


def collate(batch: list[tuple[Tensor, dict[str, Tensor]]]) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    images, targets = zip(*batch)
    return list(images), list(targets)
