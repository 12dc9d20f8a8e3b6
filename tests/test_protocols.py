"""Downstream protocols as the papers run them: given splits, the fine-tuning recipes (head, layer ids,
mixup / cutmix, multi-label), the probe's reference evaluations, the 10%-of-pixels rule, the metrics."""

import json

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from timm.data import Mixup
from torch import nn

from codemae.cli import main
from codemae.config import to_dict
from codemae.data.transforms import Normalisation
from codemae.eval import probe, splits
from codemae.eval.data import class_folders, presence_labels
from codemae.eval.finetune import (PROTOCOLS, Classifier, Recipe, evaluation_epochs, layer_decay_groups, mix_batch,
                                   seed_result)
from codemae.models.hivit import HiViT

from conftest import tiny_config

CLASSES = ("a", "b", "c")


@pytest.fixture
def tree(tmp_path):
    """<root>/<class>/<i>.png: 3 classes x 10 gray 32 px images."""
    rng = np.random.default_rng(0)
    root = tmp_path / "tree"
    for c in CLASSES:
        (root / c).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(to_dict(tiny_config(tmp_path / "run"))))
    return str(path)


def write_list(path, names):
    path.write_text("# a split list\n" + "\n".join(names) + "\n")
    return str(path)


TRAIN = ["a/0.png", "b/0", "c/0.png", "a/1.png"]            # paths with or without the suffix
TEST = [f"{c}/{i}.png" for c in CLASSES for i in range(5, 9)]  # 12 images
VAL = ["a/9.png", "b/9.png", "c/9.png"]


def test_given_lists_are_honoured_exactly(tree, tmp_path):
    given = {"train": write_list(tmp_path / "train.txt", TRAIN), "test": write_list(tmp_path / "test.txt", TEST)}
    data, split = splits.given_split(lambda root: class_folders(root, "sar", {"opt": 3, "sar": 1}), str(tree), given)
    stems = data.source.stems
    assert [stems[i] for i in split.train] == ["a/0", "b/0", "c/0", "a/1"]
    assert [stems[i] for i in split.test] == [t.removesuffix(".png") for t in TEST]
    assert not set(stems[i] for i in split.train) & set(stems[i] for i in split.test)
    assert len(split.val) == 0 and split.kind == "given"
    assert [data.classes[data.labels[i]] for i in split.train] == ["a", "b", "c", "a"]
    assert data.source.load(int(split.test[0]))["sar"].shape == (32, 32, 1)


def test_probe_and_knn_use_the_given_lists_not_the_resplit(tree, tmp_path, config, capsys, monkeypatch):
    monkeypatch.setattr(splits, "resplit", lambda data: pytest.fail("re-split used although lists were given"))
    train, test = write_list(tmp_path / "train.txt", TRAIN), write_list(tmp_path / "test.txt", TEST)
    val = write_list(tmp_path / "val.txt", VAL)
    out = tmp_path / "p.json"
    assert main(["probe", "--random", config, "--data", str(tree), "--modality", "sar", "--train", train,
                 "--test", test, "--val", val, "--seeds", "1", "--epochs", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    # the 60/20/20 re-split of 30 images would train on 18 and test on 6
    assert (result["train_size"], result["val_size"], result["test_size"]) == (4, 3, 12)
    assert result["split"] == {"kind": "given", "given": {"train": train, "val": val, "test": test},
                               "sizes": {"train": 4, "val": 3, "test": 12}}
    assert "given split (--train" in capsys.readouterr().out
    assert main(["knn", "--random", config, "--data", str(tree), "--modality", "sar", "--train", train,
                 "--test", test, "--seeds", "1", "--k", "3", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["train_size"], result["test_size"]) == (4, 12)


def test_k_shot_draws_come_from_the_given_training_list(tree, tmp_path, config, monkeypatch):
    from codemae.eval import protocols

    drawn, real = [], protocols.training_indices

    def record(data, pool, *args, **kwargs):
        picked = real(data, pool, *args, **kwargs)
        drawn.append(sorted(data.source.stems[i] for i in picked))
        return picked

    monkeypatch.setattr(protocols, "training_indices", record)
    assert main(["knn", "--random", config, "--data", str(tree), "--modality", "sar", "--shots", "1", "--seeds", "4",
                 "--k", "1", "--train", write_list(tmp_path / "train.txt", TRAIN),
                 "--test", write_list(tmp_path / "test.txt", TEST)]) == 0
    # one per class from the 4 listed images, where b and c have one each (the whole tree has 10 each)
    assert len(drawn) == 4 and all(d[0] in ("a/0", "a/1") and d[1:] == ["b/0", "c/0"] for d in drawn)


def test_a_folder_sharing_images_with_another_part_is_refused(tree, tmp_path, config, capsys):
    test = write_list(tmp_path / "test.txt", TEST)
    common = ["knn", "--random", config, "--data", str(tree), "--modality", "sar", "--seeds", "1"]
    for parts, message in (((str(tree), test), f"--test {test} holds 'a/5', also in --train {tree}; 12 shared"),
                           ((str(tree), str(tree)), f"--test {tree} holds 'a/0', also in --train {tree}; 30 shared")):
        assert main(common + ["--train", parts[0], "--test", parts[1]]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert main(["knn", "--random", config, "--data", "synthetic", "--multilabel", "--synthetic-n", "20",
                 "--synthetic-size", "32", "--seeds", "1"]) == 2
    assert "multi-label data needs probe or finetune" in capsys.readouterr().err


def test_given_folders_join_with_classes_matched_by_name(tree, tmp_path):
    other = tmp_path / "other"
    for c in ("b", "d"):
        (other / c).mkdir(parents=True)
        Image.fromarray(np.zeros((32, 32), dtype=np.uint8)).save(other / c / "x.png")
    data, split = splits.given_split(lambda root: class_folders(root, "sar", {"opt": 3, "sar": 1}), None,
                                     {"train": str(tree), "test": str(other)})
    assert data.classes == ["a", "b", "c", "d"]
    assert (len(split.train), len(split.test)) == (30, 2)
    assert [data.classes[data.labels[i]] for i in split.test] == ["b", "d"]


@pytest.mark.parametrize("train, test, message", [
    (["a/0.png", "z/404.png", "q.png"], TEST, "train.txt: 'z/404.png' is not in --data"),
    (TRAIN + ["b/6.png"], TEST, "test.txt (--test) names 'b/6', also in"),
    ([], TEST, "train.txt is empty"),
    (["0.png"], TEST, "train.txt: '0.png' names 3 samples"),
])
def test_bad_split_lists_exit_2_with_one_line_naming_list_and_name(tree, tmp_path, config, capsys, train, test,
                                                                   message):
    args = ["probe", "--random", config, "--data", str(tree), "--modality", "sar", "--seeds", "1", "--epochs", "1",
            "--train", write_list(tmp_path / "train.txt", train), "--test", write_list(tmp_path / "test.txt", test)]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1


def test_only_one_split_part_is_refused(tree, tmp_path, config, capsys):
    assert main(["probe", "--random", config, "--data", str(tree), "--modality", "sar",
                 "--train", write_list(tmp_path / "train.txt", TRAIN)]) == 2
    assert "give both --train and --test" in capsys.readouterr().err


def test_ten_percent_rule_divides_by_all_pixels():
    mask = np.zeros((10, 10), dtype=np.int64)
    mask[0] = 255                      # 10 no-data pixels
    mask[1, :9] = 1                    # 9 of 100 pixels (10% of the 90 labelled): absent
    mask[2] = 2                        # 10 of 100: present
    assert presence_labels(mask, 3, ignore_index=255).tolist() == [1.0, 0.0, 1.0]


def published_layer_id(var_name: str, num_max_layer: int = 33) -> int:
    """The authors' get_layer_id (classification/util/lr_decay.py), written out."""
    if var_name in ("cls_token", "mask_token", "pos_embed", "absolute_pos_embed"):
        return 0
    if var_name.startswith("patch_embed"):
        return 0
    if var_name.startswith("blocks"):
        return int(var_name.split(".")[1]) + 1
    return num_max_layer - 1


def published_name(name: str) -> str:
    """codemae's HiViT-B parameter name -> the iTPN classifier's, whose one ``blocks`` list holds 3 MLP
    blocks, a merge, 3 MLP blocks, a merge and the 24 attention blocks (models_itpn_dual.py)."""
    head, _, rest = name.partition(".")
    index, _, tail = rest.partition(".")
    offsets = {"stage1": 0, "stage2": 4, "blocks": 8}
    if head in offsets:
        return f"blocks.{offsets[head] + int(index)}.{tail}"
    if head in ("merge1", "merge2"):
        return f"blocks.{3 if head == 'merge1' else 7}.{rest}"
    return {"pos_embed": "absolute_pos_embed"}.get(head, name)


def test_hivit_base_layer_ids_equal_the_published_33_id_assignment():
    encoder = HiViT(32, 16, {"sar": 1}, embed_dim=32, depth=24, num_heads=2, mlp_depths=(3, 3))  # HiViT-B depths
    names = [n for n, _ in encoder.named_parameters()]
    ours = {n: encoder.layer_id(n) for n in names}
    assert ours == {n: published_layer_id(published_name(n)) for n in names}
    assert encoder.num_layers == 32 and sorted(set(ours.values())) == list(range(33))


def test_layer_decay_scales_are_decay_to_the_32_minus_id(tmp_path):
    class Method(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = HiViT(32, 16, {"sar": 1}, embed_dim=32, depth=24, num_heads=2, mlp_depths=(3, 3))

    model = Classifier(Method(), ("sar",), 3, bn_head=True)
    groups = layer_decay_groups(model, lr=1.0, weight_decay=0.05, decay=0.85)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    for name, param in model.named_parameters():
        inner = name.removeprefix("method.encoder.")
        expected = published_layer_id(published_name(inner)) if inner != name else 32
        assert scale[id(param)] == pytest.approx(0.85 ** (32 - expected)), name


def test_finetune_heads_and_protocol_table(tmp_path):
    from codemae.methods import build_method

    sar = Classifier(build_method(tiny_config(tmp_path)), ("sar",), 3, PROTOCOLS["sar-target"].bn_head)
    assert isinstance(sar.fc_norm, nn.LayerNorm) and sar.fc_norm.eps == 1e-6
    assert isinstance(sar.norm, nn.BatchNorm1d) and not sar.norm.affine and sar.norm.eps == 1e-6
    assert isinstance(Classifier(sar.method, ("sar",), 3, PROTOCOLS["optical-scene"].bn_head).norm, nn.Identity)
    acd, scene, multi = PROTOCOLS["sar-acd"], PROTOCOLS["optical-scene"], PROTOCOLS["multilabel"]
    assert acd.layer_decay == 1.0 and acd.min_lr == 1e-6 and (acd.epochs, acd.batch_size) == (60, 50)
    assert (scene.batch_size, scene.mixup, scene.cutmix, scene.label_smoothing, scene.erase_prob) == (
        32, 0.8, 1.0, 0.1, 0.25)
    assert (scene.layer_decay, scene.drop_path, scene.epochs, scene.warmup_epochs) == (0.85, 0.1, 100, 5)
    assert multi.multilabel and multi.epochs == 10
    assert evaluation_epochs(60)[:3] == [1, 5, 10] and evaluation_epochs(12) == [1, 5, 10, 12]


def smoothed(label: int, classes: int = 3, smoothing: float = 0.1) -> torch.Tensor:
    return torch.full((classes,), smoothing / classes).index_fill(0, torch.tensor([label]), 1 - smoothing +
                                                                   smoothing / classes)


@pytest.mark.parametrize("mixup, cutmix", [(0.8, 0.0), (0.0, 1.0)])
def test_mixup_and_cutmix_soft_labels_by_hand(mixup, cutmix):
    np.random.seed(3)
    mixer = Mixup(mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1, num_classes=3)
    images = {"opt": torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8)]),
              "sar": torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)])}
    mixed, targets = mix_batch(images, torch.tensor([0, 2]), mixer)
    # sample 0 (zeros) mixed with its partner (ones): the share of the partner is its mean value
    lam = 1 - mixed["opt"][0].mean().item()
    assert 0 < lam < 1
    assert torch.allclose(targets[0], lam * smoothed(0) + (1 - lam) * smoothed(2), atol=1e-6)
    assert torch.allclose(targets[1], lam * smoothed(2) + (1 - lam) * smoothed(0), atol=1e-6)
    assert torch.equal(mixed["sar"][0, 0], mixed["opt"][0, 0])  # the same lambda / box for every modality
    if cutmix:
        assert set(mixed["opt"][0].unique().tolist()) == {0.0, 1.0}  # a pasted box, not a blend
    assert targets.sum(1).allclose(torch.ones(2))


def test_optical_recipe_uses_the_published_mixing():
    norm = {"opt": Normalisation([0.5] * 3, [0.25] * 3)}
    recipe = Recipe(PROTOCOLS["optical-scene"], norm, 16, 5)
    m = recipe.mixer
    assert (m.mixup_alpha, m.cutmix_alpha, m.label_smoothing, m.mix_prob, m.switch_prob, m.mode) == (
        0.8, 1.0, 0.1, 1.0, 0.5, "batch")
    torch.manual_seed(0)
    images, targets = recipe.train_batch({"opt": torch.rand(4, 3, 16, 16)}, torch.tensor([0, 1, 2, 3]))
    assert images["opt"].shape == (4, 3, 16, 16) and targets.shape == (4, 5)
    assert recipe.loss(torch.zeros(4, 5), targets).item() == pytest.approx(np.log(5), rel=1e-5)
    assert Recipe(PROTOCOLS["sar-target"], {"sar": norm["opt"]}, 16, 5).mixer is None


def test_finetune_honest_and_reference_results_by_hand():
    labels = torch.tensor([0, 1, 1, 0])
    right, wrong = torch.tensor([[1.0, 0], [0, 1], [0, 1], [1, 0]]), torch.tensor([[0.0, 1], [1, 0], [1, 0], [0, 1]])
    half = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])
    val = torch.tensor([0, 1])
    # test: epoch 1 50%, epoch 5 0%, epoch 10 100%; validation best at epoch 5
    evaluations = {1: (wrong[:2], half), 5: (right[:2], wrong), 10: (wrong[:2], right)}
    result = seed_result(evaluations, val, labels, False, "honest")
    assert result["honest"] == 0.0 and result["reference (best of test evaluations every 5 epochs)"] == 100.0
    no_val = {e: (None, test) for e, (_, test) in evaluations.items()}
    assert seed_result(no_val, val, labels, False, "honest")["honest"] == 100.0  # the last epoch


def test_probe_reference_only_looks_at_every_fifth_epoch():
    assert probe.reference_epochs(50) == list(range(5, 55, 5)) and probe.reference_epochs(12) == [5, 10, 12]
    torch.manual_seed(0)
    x, y = torch.randn(40, 6), torch.arange(2).repeat(20)
    result = probe.train_probe(x, y, x[:0], y[:0], x, lambda: y, 2, False, seed=0, epochs=12, batch=8)
    assert sorted(result.reference_curve) == [5, 10, 12]
    assert result.reference == max(result.reference_curve.values())
    assert result.honest_epoch == 12 and result.honest == result.reference_curve[12]  # no validation: last epoch


def test_weighted_precision_recall_f1_by_hand():
    labels = torch.tensor([0, 0, 0, 1])
    logits = torch.tensor([[1.0, 0], [1, 0], [0, 1], [0, 1]])  # predictions 0, 0, 1, 1
    m = probe.metrics(logits, labels, multilabel=False)
    # class 0: P 1, R 2/3, F1 0.8 (support 3); class 1: P 0.5, R 1, F1 2/3 (support 1)
    assert m["OA"] == pytest.approx(75.0)
    assert m["weighted precision"] == pytest.approx(100 * (3 * 1 + 0.5) / 4)
    assert m["weighted recall"] == pytest.approx(100 * (3 * 2 / 3 + 1) / 4)
    assert m["weighted F1"] == pytest.approx(100 * (3 * 0.8 + 2 / 3) / 4)


def test_perfect_multilabel_predictions_score_100_micro_and_macro():
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 0]], dtype=torch.float32)
    m = probe.metrics((labels - 0.5) * 10, labels, multilabel=True)
    assert m == {"micro mAP": pytest.approx(100.0), "macro mAP": pytest.approx(100.0)}
    worse = probe.metrics(torch.zeros(3, 3), labels, multilabel=True)
    assert worse["micro mAP"] < 100


def test_multilabel_finetuning_trains_on_generated_multilabel_scenes(tmp_path, config, capsys):
    out = tmp_path / "ml.json"
    common = ["finetune", "--random", config, "--data", "synthetic", "--multilabel", "--synthetic-n", "30",
              "--synthetic-size", "40", "--modality", "both", "--shots", "0", "--seeds", "1", "--epochs", "1"]
    assert main(common + ["--protocol", "multilabel", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["metric"] == "micro mAP" and result["train_size"] == 18
    assert set(result["summary"]) == {"honest (val-selected, test once)", "honest macro mAP",
                                      "reference (best of test evaluations every 5 epochs)"}
    assert 0 < result["summary"]["honest macro mAP"]["mean"] <= 100
    assert main(common + ["--protocol", "sar-target"]) == 2
    assert "multi-label data needs --protocol multilabel" in capsys.readouterr().err


def test_sar_target_finetuning_on_lists_with_layer_decay_override(tree, tmp_path, config):
    out = tmp_path / "ft.json"
    assert main(["finetune", "--random", config, "--data", str(tree), "--modality", "sar", "--protocol", "sar-acd",
                 "--layer-decay", "0.7", "--train", write_list(tmp_path / "train.txt", TRAIN),
                 "--val", write_list(tmp_path / "val.txt", VAL), "--test", write_list(tmp_path / "test.txt", TEST),
                 "--seeds", "1", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert (result["train_size"], result["val_size"], result["test_size"]) == (4, 3, 12)
    assert result["protocol"]["layer_decay"] == 0.7 and result["split"]["kind"] == "given"
    assert {"honest (val-selected, test once)", "reference (best of test evaluations every 5 epochs)",
            "honest weighted F1"} <= set(result["summary"])


def test_optical_scene_finetuning_runs_and_refuses_two_modalities(tmp_path, config, capsys):
    common = ["finetune", "--random", config, "--data", "synthetic", "--synthetic-n", "30", "--synthetic-size", "40",
              "--protocol", "optical-scene", "--shots", "0", "--seeds", "1", "--epochs", "1"]
    out = tmp_path / "o.json"
    assert main(common + ["--modality", "opt", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["split"]["kind"] == "re-split"
    assert main(common + ["--modality", "both"]) == 2
    assert "augments one modality" in capsys.readouterr().err


def test_fusmae_linear_probe_trains_on_one_percent_with_adamw(tmp_path, config, capsys):
    recipe = probe.RECIPES["fusmae-linear"]
    assert (recipe.optimizer, recipe.epochs, recipe.batch, recipe.label_fraction, recipe.bn_head) == (
        "adamw", 20, 128, 0.01, False)
    assert isinstance(probe.probe_optimizer(probe.build_head(4, 2, bn=False), recipe), torch.optim.AdamW)
    out = tmp_path / "f.json"
    common = ["probe", "--random", config, "--data", "synthetic", "--synthetic-n", "400", "--synthetic-size", "32",
              "--modality", "opt", "--protocol", "fusmae-linear", "--seeds", "1", "--epochs", "2"]
    assert main(common + ["--out", str(out)]) == 0
    assert json.loads(out.read_text())["train_size"] == 2  # 1% of the 240-image training part
    assert main(common + ["--shots", "5"]) == 2
    assert "--shots does not apply" in capsys.readouterr().err


def test_split_lists_command_writes_a_stratified_disjoint_split(tree, tmp_path, config):
    out = tmp_path / "lists"
    assert main(["split-lists", "--data", str(tree), "--out", str(out), "--fractions", "0.6", "0.2", "0.2"]) == 0
    parts = {p: (out / f"{p}.txt").read_text().split() for p in ("train", "val", "test")}
    assert [len(v) for v in parts.values()] == [18, 6, 6]
    assert sorted(n.split("/")[0] for n in parts["test"]) == ["a", "a", "b", "b", "c", "c"]
    assert len(set().union(*parts.values())) == 30 and all(n.endswith(".png") for n in parts["train"])
    assert main(["knn", "--random", config, "--data", str(tree), "--modality", "sar", "--seeds", "1", "--k", "3",
                 *[a for p in parts for a in (f"--{p}", str(out / f"{p}.txt"))]]) == 0
    assert main(["split-lists", "--data", str(tree), "--out", str(out), "--fractions", "0.6", "0.6", "0.2"]) == 2


@pytest.mark.slow
def test_mstar_lists_and_sar_target_finetuning(tmp_path, config):
    from conftest import shared_data

    mstar = shared_data("mstar/train_17deg")
    lists = tmp_path / "lists"
    assert main(["split-lists", "--data", str(mstar), "--out", str(lists)]) == 0
    out = tmp_path / "mstar.json"
    assert main(["finetune", "--random", config, "--data", str(mstar), "--modality", "sar", "--protocol",
                 "sar-target", "--train", str(lists / "train.txt"), "--test", str(lists / "test.txt"), "--shots", "2",
                 "--seeds", "1", "--epochs", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["train_size"] == 20 and result["test_size"] == len((lists / "test.txt").read_text().split())
