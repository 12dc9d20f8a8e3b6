"""The ``codemae`` command: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from codemae import __version__
from codemae.cli.args import (
    CommandParser,
    HelpFormatter,
    add_device_arg,
    finite_float,
    fraction,
    non_negative_int,
    positive_float,
    positive_int,
)
from codemae.errors import CodemaeError, ConfigError, one_line

if TYPE_CHECKING:
    from codemae.data.sources import Source
    from codemae.eval.data import LabelledSet
    from codemae.eval.splits import Split


def cmd_pretrain(args: argparse.Namespace) -> int:
    from codemae.config import load_config
    from codemae.train.engine import pretrain

    summary = pretrain(load_config(args.config, args.overrides))
    if os.environ.get("RANK", "0") == "0":
        print(json.dumps({k: summary[k] for k in ("step", "world_size", "ranks_in_sync", "seconds")}))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    from codemae.config import ModelConfig, ScalingConfig, SourceConfig
    from codemae.data.sources import build_source
    from codemae.data.stats import compute_stats, save_stats

    scaling = ScalingConfig(mode=args.scaling, db_range=list(args.db_range))
    cfg = SourceConfig(kind=args.kind, root=args.root, split=args.split, split_csv=args.split_csv,
                       opt_scaling=scaling if args.kind == "opt" else ScalingConfig(), sar_scaling=scaling)
    model = ModelConfig(opt_channels=args.opt_channels, sar_channels=args.sar_channels)
    source = build_source(cfg, model.channels)
    stats = compute_stats(source, args.samples)
    out = Path(args.out) if args.out else Path(args.root) / "codemae_stats.json"
    save_stats(stats, out, min(args.samples, len(source)))
    for m, s in stats.items():
        print(f"{m}: mean {[round(v, 4) for v in s.mean]} std {[round(v, 4) for v in s.std]}")
    print(f"wrote {out}")
    return 0


def cmd_data_check(args: argparse.Namespace) -> int:
    from codemae.config import load_config
    from codemae.data.check import check_config, print_check

    cfg = load_config(args.config, args.overrides)
    return 0 if print_check(check_config(cfg, args.pixels, args.workers)) else 2


def cmd_config_show(args: argparse.Namespace) -> int:
    import yaml

    from codemae.config import load_config, to_dict

    print(yaml.safe_dump(to_dict(load_config(args.config, args.overrides)), sort_keys=False), end="")
    return 0


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    from codemae.config import load_config
    from codemae.data.pipeline import build_sources
    from codemae.eval.device import resolve_device
    from codemae.loading import build_teacher
    from codemae.train.teacher_features import write_teacher_cache

    device = resolve_device(args.device)
    cfg = load_config(args.config, args.overrides)
    teacher_cfg = cfg.method.teacher
    if not teacher_cfg.cache:
        raise ConfigError("config key 'method.teacher.cache': the folder to write the features to is not set")
    teacher = build_teacher(teacher_cfg)
    if teacher is None:
        raise ConfigError("config key 'method.teacher.kind': none; choose hf, hub or checkpoint")
    teacher.to(device)
    size = teacher_cfg.input_size or cfg.model.img_size
    for source in build_sources(cfg.data, cfg.model.channels):
        if "opt" in source.modalities:
            path = write_teacher_cache(teacher, source, teacher_cfg.cache, size, args.batch_size)
            print(f"wrote {path} ({len(source)} images)")
    return 0


def labelled_data(args: argparse.Namespace, channels: dict[str, int], root: str | None = None) -> LabelledSet:
    """The labelled set in ``root`` (default --data): a class-folder tree, a paired folder with --labels
    or --masks, or 'synthetic'."""
    from codemae.eval.data import class_folders, paired_with_labels, paired_with_masks, synthetic_scenes

    root = root or args.data
    if root is None:
        raise ConfigError("give --data, or --train and --test folders")
    if root == "synthetic":
        return synthetic_scenes(args.synthetic_n, args.synthetic_size, 100_000, channels, args.multilabel)
    if args.masks:
        return paired_with_masks(root, args.masks, channels, args.nodata)
    if args.labels:
        return paired_with_labels(root, args.labels, channels)
    if args.modality == "both":
        raise ConfigError("--modality both needs paired data: give --labels with a paired folder, or --data synthetic")
    return class_folders(root, args.modality, channels)


def labelled_split(args: argparse.Namespace, channels: dict[str, int]) -> tuple[LabelledSet, Split]:
    """The labelled set and its split: the given --train/--test[/--val] (folders or split lists of --data),
    else the stratified re-split of --data; printed, so every result says which it used."""
    from codemae.eval.splits import given_split, resplit

    given = {part: getattr(args, part) for part in ("train", "val", "test") if getattr(args, part)}
    if given:
        data, split = given_split(lambda root: labelled_data(args, channels, root), args.data, given)
    else:
        data = labelled_data(args, channels)
        split = resplit(data)
    print(f"split: {split.describe()}")
    return data, split


def training_shots(args: argparse.Namespace, split: Split) -> int:
    """--shots, defaulting to 10 on the re-split and to the whole given training set."""
    return args.shots if args.shots is not None else (0 if split.kind == "given" else 10)


def evaluation_setup(args: argparse.Namespace):
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate

    device = resolve_device(args.device)
    method = method_to_evaluate(args.checkpoint, args.random).to(device)
    return (method, *labelled_split(args, method.encoder.channels))


def seeds_of(args: argparse.Namespace) -> list[int]:
    return list(range(args.first_seed, args.first_seed + args.seeds))


def finish(title: str, result: dict, args: argparse.Namespace) -> int:
    from codemae.eval.report import print_table, write_json

    print_table(title, result["summary"], args.seeds)
    write_json(args.out, {"command": sys.argv[1:], "seeds": seeds_of(args), **result})
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from codemae.eval.report import merge_results, print_table, write_json

    parts = {}
    for path in args.results:
        try:
            parts[path] = json.loads(Path(path).read_text())
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path}: cannot read a JSON result ({one_line(e)})") from None
    merged = merge_results(parts)
    print_table(f"{' '.join(merged['command'][:1])}, seeds {', '.join(map(str, merged['seeds']))}",
                merged["summary"], len(merged["seeds"]))
    write_json(args.out, merged)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from codemae.eval.probe import RECIPES
    from codemae.eval.protocols import run_probe

    recipe = RECIPES[args.protocol]
    if recipe.label_fraction is not None and args.shots:
        raise ConfigError(f"--protocol {args.protocol} trains on {recipe.label_fraction:.0%} of the labels; "
                          "--shots does not apply")
    method, data, split = evaluation_setup(args)
    shots = training_shots(args, split) if recipe.label_fraction is None else 0
    result = run_probe(method, data, split, args.modality, shots, args.kshot, seeds_of(args), args.centre_crop,
                       args.epochs, recipe)
    drawn = (f"{recipe.label_fraction:.0%} of the labels" if recipe.label_fraction is not None
             else f"{shots}-shot ({args.kshot})" if shots > 0 else "whole training set")
    title = (f"linear probe ({args.protocol}), {args.modality}, {drawn}, {result['metric']} %, train "
             f"{result['train_size']} / val {result['val_size']} / test {result['test_size']}")
    return finish(title, result, args)


def cmd_split_lists(args: argparse.Namespace) -> int:
    from codemae.eval.data import class_folders
    from codemae.eval.splits import write_split_lists

    if len(args.fractions) != 3 or abs(sum(args.fractions) - 1) > 1e-6 or min(args.fractions) < 0:
        raise ConfigError(f"--fractions {' '.join(map(str, args.fractions))}: give train, val and test "
                          "fractions >= 0 summing to 1")
    data = class_folders(args.data, "sar", {"opt": 3, "sar": 1})
    written = write_split_lists(data, args.data, dict(zip(("train", "val", "test"), args.fractions)), args.seed,
                                args.out)
    for part, path in written.items():
        print(f"wrote {path} ({len(path.read_text().splitlines())} images)")
    print(f"use them with --data {args.data} " + " ".join(f"--{p} {path}" for p, path in written.items()))
    return 0


def cmd_knn(args: argparse.Namespace) -> int:
    from codemae.eval.protocols import run_knn

    method, data, split = evaluation_setup(args)
    result = run_knn(method, data, split, args.modality, training_shots(args, split), args.kshot, seeds_of(args),
                     args.k, args.centre_crop)
    return finish(f"k-NN, {args.modality}, train {result['train_size']} / test {result['test_size']}", result, args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.finetune import PROTOCOLS, run_finetune

    device = resolve_device(args.device)
    protocol = PROTOCOLS[args.protocol]
    if args.epochs:
        protocol = dataclasses.replace(protocol, epochs=args.epochs)
    if args.layer_decay is not None:
        protocol = dataclasses.replace(protocol, layer_decay=args.layer_decay)
    load = lambda seed: method_to_evaluate(  # noqa: E731
        args.checkpoint, args.random, seed, protocol.drop_path).to(device)
    if args.cnn:
        from codemae.eval.cnn import CNNMethod

        load = lambda seed: CNNMethod(args.cnn, {"opt": 3, "sar": 1}).to(device)  # noqa: E731
    data, split = labelled_split(args, load(0).encoder.channels)
    shots = training_shots(args, split)
    result = run_finetune(load, data, split, args.modality, shots, args.kshot, seeds_of(args), protocol)
    drawn = f"{shots}-shot ({args.kshot})" if shots > 0 else "whole training set"
    title = (f"fine-tuning ({args.protocol}, layer decay {protocol.layer_decay}), {args.modality}, {drawn}, "
             f"{protocol.epochs} epochs, {result['metric']} %, train {result['train_size']} / val "
             f"{result['val_size']} / test {result['test_size']}")
    return finish(title, result, args)


def cmd_segment(args: argparse.Namespace) -> int:
    from codemae.config import ScalingConfig
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.segmentation import (SCENE_SPLIT, Recipe, choose_split, folder_segmentation,
                                           run_segmentation, scene_regions, synthetic_segmentation)

    if bool(args.data) != bool(args.masks):
        raise ConfigError("--data and --masks go together: a paired folder and the folder of its label rasters")
    if args.scene and args.data:
        raise ConfigError("give either --scene or --data/--masks, not both")
    device = resolve_device(args.device)
    recipe = Recipe(head=args.head, channels=args.channels, aux_head=args.aux_head, train_encoder=args.finetune_encoder,
                    lr=args.lr, layer_decay=args.layer_decay, weight_decay=args.weight_decay, drop_path=args.drop_path,
                    iters=args.iters, warmup_iters=args.iters // 20 if args.warmup_iters is None else args.warmup_iters,
                    power=args.power, min_lr=args.min_lr,
                    batch_size=args.batch_size, crop=args.crop, stride=args.stride)
    drop_path = recipe.drop_path if recipe.train_encoder else None  # a frozen encoder runs in eval mode
    load = lambda: method_to_evaluate(args.checkpoint, args.random, drop_path=drop_path).to(device)  # noqa: E731
    encoder = load().encoder
    channels = encoder.channels
    lists = {k: v for k, v in (("train", args.train), ("test", args.test), ("val", args.val)) if v}
    if lists and not args.masks:
        raise ConfigError("--train/--test/--val split lists name the stems of --data/--masks folders")
    if args.masks:
        data = folder_segmentation(args.data, args.masks, channels, args.nodata)
    elif args.scene:
        opt, sar, mask = args.scene
        scaling = {"opt": ScalingConfig(max_value=args.opt_max), "sar": ScalingConfig(mode="db", db_range=args.sar_db)}
        data = scene_regions({"opt": opt, "sar": sar}, mask, channels, {"opt": args.opt_bands, "sar": args.sar_bands},
                             scaling, args.train_fraction, args.nodata)
    else:
        data = synthetic_segmentation(args.synthetic_n, args.synthetic_size or encoder.img_size, 200_000, channels)
    if args.scene:
        split, how = SCENE_SPLIT, f"one scene: top {args.train_fraction:.0%} of the rows train, the rest test"
    else:
        split, how = choose_split(data, lists, args.train_fraction, args.data or "")
    result = run_segmentation(load, data, args.modality, recipe, seeds_of(args), split)
    mode = "fine-tuned" if args.finetune_encoder else "frozen"
    title = (f"segmentation, {args.head} head, {args.modality}, {mode} encoder, {args.iters} iterations, crop "
             f"{result['crop']}, {how}: train {result['train_images']} / test {result['test_images']} images, "
             f"classes {', '.join(result['classes'])}")
    return finish(title, {**result, "split": how}, args)


def cmd_damage(args: argparse.Namespace) -> int:
    from codemae.eval.damage import DamageProtocol, run_damage
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate

    device = resolve_device(args.device)
    protocol = DamageProtocol(epochs=args.epochs, batch_size=args.batch_size, crops_per_scene=args.crops_per_scene,
                              lr=args.lr)
    load = lambda seed: method_to_evaluate(  # noqa: E731
        args.checkpoint, args.random, seed, protocol.drop_path).to(device)
    result = run_damage(load, args.data, protocol, seeds_of(args), args.img_size)
    scenes = result["scenes"]
    title = (f"damage assessment (optical pre, SAR post), {protocol.epochs} epochs, window {result['window']}, "
             f"train {scenes['train']} / val {scenes['val']} / test {scenes['test']} scenes, test %")
    return finish(title, result, args)


def cmd_synth(args: argparse.Namespace) -> int:
    from codemae.data.write_synthetic import write_synthetic

    written = write_synthetic(args.task, args.out, args.n, args.size, args.seed)
    print(f"wrote {args.n} {args.task} samples of {args.size} px under {args.out}: "
          f"{', '.join(p.name for p in written)}")
    return 0


def cmd_detect(args: argparse.Namespace) -> int:
    from codemae.eval.detection import DetectionRecipe, run_detection, schedule
    from codemae.eval.detection_data import DetectionImages, detection_sets, multiscale_sizes, train_transform
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate

    device = resolve_device(args.device)
    epochs, milestones = schedule(args.schedule, args.epochs)
    recipe = DetectionRecipe(epochs=epochs, milestones=milestones, batch_size=args.batch_size, base_lr=args.lr,
                             fpn_width=args.fpn_width, box_head=args.box_head, rois_per_image=args.rois_per_image)
    load = lambda seed: method_to_evaluate(args.checkpoint, args.random, seed, recipe.drop_path)  # noqa: E731
    channels = load(0).encoder.channels
    if args.modality not in channels:
        raise ConfigError(f"--modality {args.modality}: the encoder embeds only {', '.join(channels)}")
    if args.img_size % 32:
        raise ConfigError(f"--img-size {args.img_size}: must be a multiple of 32 (the FPN's coarsest stride)")
    classes = [c.strip() for c in args.classes.split(",")] if args.classes else None
    train, test = detection_sets(args.data, args.format, args.train_split, args.train, args.test, classes)
    for note in train.notes:
        print(note)
    print(f"train: {len(train.items)} images ({train.background_only} background-only), test: {len(test.items)} "
          f"images ({test.background_only} background-only); {train.clipped_boxes} boxes clipped to their image")
    scales = multiscale_sizes(args.img_size) if args.multiscale else None
    key, c = f"model.{args.modality}_channels", channels[args.modality]
    train_images = DetectionImages(train, max(scales or [args.img_size]), c, key, transform=train_transform(scales))
    test_images = DetectionImages(test, args.img_size, c, key)
    result = run_detection(load, train_images, test_images, args.modality, args.img_size, recipe, seeds_of(args),
                           progress=True, device=device)
    result.update(classes=train.classes, train_images=len(train.items), test_images=len(test.items),
                  epochs=epochs, lr_steps=list(milestones), img_size=args.img_size, split=train.notes)
    title = (f"detection (Faster R-CNN), {args.modality}, {epochs} epochs (lr steps {list(milestones)}), "
             f"{args.img_size} px{' multi-scale' if scales else ''}, train {len(train.items)} / test "
             f"{len(test.items)} images, %")
    return finish(title, result, args)


def unpaired_images(args: argparse.Namespace, channels: dict[str, int]) -> Source | None:
    """--images (one modality, any image tree), restricted to --images-list; None without --images."""
    from codemae.config import SourceConfig
    from codemae.data.sources import FolderSource
    from codemae.eval.split_lists import read_split_list
    from codemae.eval.splits import JoinedSource, list_indices

    if args.images is None:
        return None
    source = FolderSource(SourceConfig(kind=args.images_modality, root=args.images, name="images"), channels)
    if not args.images_list:
        return source
    path = Path(args.images_list)
    return JoinedSource([(source, list_indices(read_split_list(path), source.stems, path, args.images, "--images"))])


def images_label(root: str | None, names: str | None) -> str:
    """How the report names the unpaired images: their folder, and the list's name if one picks them."""
    if root is None:
        return ""
    label = Path(root).resolve().name
    return f"{label}/{Path(names).stem}" if names else label


def cmd_analyze(args: argparse.Namespace) -> int:
    from codemae.analysis.collect import collect
    from codemae.analysis.report import Analysis, write_report
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.protocols import paired_source

    device = resolve_device(args.device)
    checkpoints = args.checkpoints if args.command == "compare" else [args.checkpoint]
    if args.images_list and not args.images:
        raise ConfigError("--images-list names images of --images: give --images too")
    analyses, patch = [], 16
    for ckpt in checkpoints:
        method = method_to_evaluate(ckpt).to(device)
        source = paired_source(args.pairs, args.split, method.encoder.channels, args.pairs_n)
        images = unpaired_images(args, method.encoder.channels)
        patch = method.encoder.patch_size
        name = Path(ckpt).parent.parent.name if Path(ckpt).parent.name == "checkpoints" else Path(ckpt).stem
        analyses.append(Analysis.of(name, collect(method, source, args.pairs_n, images=images,
                                                  images_name=images_label(args.images, args.images_list))))
    page = write_report(analyses, Path(args.out), f"{args.pairs} ({args.split or 'all'})", patch)
    print(f"report: {page}")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from codemae.eval.device import resolve_device
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.protocols import paired_source, run_retrieval
    from codemae.eval.report import write_json
    from codemae.eval.retrieval import random_expectation

    method = method_to_evaluate(args.checkpoint, args.random).to(resolve_device(args.device))
    result = run_retrieval(method, paired_source(args.pairs, args.split, method.encoder.channels, args.synthetic_n))
    chance = random_expectation(result["pairs"])
    print(f"cross-modal retrieval on {result['pairs']} pairs (chance: R@1 {chance['R@1']:.2f}, "
          f"R@5 {chance['R@5']:.2f}, median rank {chance['median rank']:.1f})")
    for key, value in result["metrics"].items():
        print(f"  {key:<22} {value:8.2f}")
    write_json(args.out, {"command": sys.argv[1:], **result, "chance": chance})
    return 0


def cmd_shard(args: argparse.Namespace) -> int:
    from codemae.config import load_config
    from codemae.data.shard_writer import write_shards
    from codemae.data.shards import read_manifest

    cfg = load_config(args.source, args.overrides)
    manifest = write_shards(cfg.data, cfg.model.channels, Path(args.out), args.samples_per_shard)
    for s in read_manifest(str(manifest.parent)):
        print(f"{s.name}: {s.kind}, {s.samples} samples in {len(s.shards)} shards")
    print(f"wrote {manifest}; train on it with a source {{layout: shards, root: {manifest.parent}}}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from codemae.export import WEIGHTS, export_encoder

    out = export_encoder(args.checkpoint, args.out, args.format, args.modality)
    how = {"codemae": f"codemae.load_encoder('{out}')", "hf": "codemae.export.ExportedEncoder.from_pretrained",
           "timm": "timm.create_model(**config.json['timm']) (see README.md)"}[args.format]
    note = json.loads((out / "config.json").read_text())["normalisation_note"]
    if "unknown" in note:
        print(f"note: normalisation statistics {note}")
    print(f"wrote {out} ({WEIGHTS[args.format]}, config.json, README.md); load it with {how}")
    return 0


def cmd_embed(args: argparse.Namespace) -> int:
    from codemae.eval.device import resolve_device
    from codemae.eval.embed import embed_folder, embed_scene, embedding_encoder, output_name

    if not Path(args.input).exists() and "://" not in args.input and not args.input.startswith("/vsi"):
        raise ConfigError(f"--input {args.input}: no such folder or scene")
    encoder = embedding_encoder(args.checkpoint, resolve_device(args.device))
    out = Path(args.out)
    if Path(args.input).is_dir():
        result = embed_folder(encoder, args.input, args.modality, out, args.batch_size or 32)
        print(f"embedded {result['images']} images ({result['dim']}-d) to {result['path']}, "
              f"file names in {result['index']}")
        return 0
    tile = args.tile or encoder.encoder.img_size
    overlap = args.overlap if args.overlap is not None else tile // 2 // encoder.patch_size * encoder.patch_size
    result = embed_scene(encoder, args.input, args.modality, out / output_name(args.input), tile, overlap,
                         args.batch_size or 8)
    for note in result["notes"]:
        print(f"note: {note}")
    print(f"wrote {result['path']}: {result['dim']} bands on a {result['size'][0]}x{result['size'][1]} patch grid "
          f"(tile {tile}, overlap {overlap}; {result['nodata_patches']} nodata patches)")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from codemae import official
    from codemae.config import to_dict
    from codemae.export import write_export

    if args.source == "codemae-official":
        out = official.convert_checkpoint(args.checkpoint, args.out, args.overrides)
        print(f"wrote {out}: a codemae checkpoint of the published model; evaluate it with --checkpoint {out}")
    elif args.source == "codemae-official-classifier":
        out = official.convert_classifier(args.checkpoint, args.out, args.overrides)
        print(f"wrote {out}: the published classifier; score it with codemae classify --classifier {out}")
    else:
        method, cfg = official.imagenet_method(args.checkpoint, args.overrides)
        out = write_export(method, to_dict(cfg), args.out, {"checkpoint": args.checkpoint, "step": None})
        print(f"wrote {out}: the ImageNet-1K iTPN encoder; evaluate it with --checkpoint {out}")
    return 0


def cmd_classify(args: argparse.Namespace) -> int:
    from codemae.data.transforms import Normalisation
    from codemae.eval.classify import classify
    from codemae.eval.data import class_folders
    from codemae.eval.report import write_json
    from codemae.official import load_classifier

    from codemae.eval.device import resolve_device

    model = load_classifier(args.classifier).to(resolve_device(args.device))
    if len(model.modalities) != 1 or args.modality not in model.modalities:
        raise ConfigError(f"--modality {args.modality}: the classifier takes {', '.join(model.modalities)}")
    data = class_folders(args.data, args.modality, model.encoder.channels)
    norm = Normalisation(args.mean, args.std) if args.mean else None
    result = classify(model, data, args.modality, model.encoder.img_size, norm, args.centre_crop)
    print(f"{args.classifier} on {args.data}: overall accuracy {result['accuracy']:.2f}% ({result['samples']} images)")
    write_json(args.out, {"command": sys.argv[1:], **result})
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from codemae.bench import run_bench
    from codemae.bench_official import run_against_official

    if args.against_official:
        run_against_official(args.against_official, args.img_size, args.batch_size, args.steps, args.threads,
                             args.compile, args.out)
        return 0
    run_bench(args.backbones, args.img_size, args.batch_size, args.steps, args.threads, args.out, args.workers,
              args.compile)
    return 0


def seed_args(p: argparse.ArgumentParser, default: int, what: str) -> None:
    """``--seeds N --first-seed S``: seeds S..S+N-1 (one evaluation's seeds split over runs; ``codemae merge``)."""
    p.add_argument("--seeds", type=positive_int, default=default, help=f"how many seeds ({what})")
    p.add_argument("--first-seed", type=non_negative_int, default=0,
                   help="the first seed: --seeds N runs seeds S..S+N-1 (split seeds over runs, then codemae merge)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codemae", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"codemae {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=CommandParser)

    p = sub.add_parser("pretrain", help="pretrain an encoder (one process, or many under torchrun)",
                       description="Pretrain from a YAML config with key=value overrides; resumes "
                                   "automatically from <run_dir>/checkpoints/last.pt. Note: method.teacher.kind=hub "
                                   "runs the hubconf.py of the folder the config names, so such configs must be "
                                   "trusted like code.")
    p.add_argument("--config", help="YAML config file (default: built-in defaults)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=10 data.batch_size=64")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("stats", help="compute a source's per-modality normalisation statistics",
                       description="Mean/std per channel of [0,1]-scaled images, written as JSON "
                                   "for a source's 'stats' config key.")
    p.add_argument("root", help="source folder (paired: with opt/ and sar/ inside)")
    p.add_argument("--kind", choices=["paired", "opt", "sar"], default="paired")
    p.add_argument("--split", help="only this split (needs a split CSV)")
    p.add_argument("--split-csv", help="split CSV (default <root>/tiles.csv)")
    p.add_argument("--scaling", choices=["auto", "db", "linear"], default="auto", help="SAR (or --kind opt) scaling")
    p.add_argument("--db-range", type=finite_float, nargs=2, default=(-25.0, 0.0), metavar=("LO", "HI"))
    p.add_argument("--opt-channels", type=positive_int, default=3)
    p.add_argument("--sar-channels", type=positive_int, default=1)
    p.add_argument("--samples", type=positive_int, default=1024, help="at most this many evenly spaced samples")
    p.add_argument("--out", help="output JSON (default <root>/codemae_stats.json)")
    p.set_defaults(func=cmd_stats)

    p = sub.add_parser("data", help="dataset tools: 'data check CONFIG' walks every source without training")
    data_sub = p.add_subparsers(dest="data_command", required=True)
    p = data_sub.add_parser("check", help="report files, pairs, sizes, channels, unreadable files and split leaks",
                            description="Walks every source of a pretraining or data config and prints a table per "
                                        "source, then every problem naming its file; exit code 2 if any. Reads "
                                        "image headers only unless --pixels.")
    p.add_argument("config", help="YAML config with data.sources (a pretraining config or a configs/data file)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/datasets/OSPretrain")
    p.add_argument("--pixels", action="store_true", help="decode every image as training would (slow)")
    p.add_argument("--workers", type=positive_int, default=8, help="threads reading headers")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("config", help="config tools: 'config show CONFIG [key=value ...]' prints the resolved config")
    config_sub = p.add_subparsers(dest="config_command", required=True)
    p = config_sub.add_parser("show", help="print the config a run would use, as YAML",
                              description="The config after its 'base' chain, the overrides and the defaults of "
                                          "every key not set, validated as pretrain would.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=10")
    p.set_defaults(func=cmd_config_show)

    p = sub.add_parser("shard", help="convert folder sources into WebDataset tar shards with a manifest",
                       description="Writes <out>/<source>/shard-NNNNNN.tar per source (paired and unpaired apart) "
                                   "and <out>/manifest.json with statistics, counts and SHA-256 checksums.")
    p.add_argument("--source", required=True, help="config whose data.sources to shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=positive_int, default=1000)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/datasets/OSPretrain")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("export", help="write a checkpoint's encoder (codemae, timm or Hugging Face format)",
                       description="The encoder alone (no optimiser state, decoders or pretraining heads) as "
                                   "safetensors, with config.json (geometry, channels, band names, the training "
                                   "normalisation, method, source checkpoint) and a model card README.md. "
                                   "codemae: codemae.load_encoder(DIR); hf: PyTorchModelHubMixin.from_pretrained; "
                                   "timm: ViT encoders as timm VisionTransformer weights of one modality.")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--format", choices=["codemae", "timm", "hf"], default="codemae", help="export format")
    p.add_argument("--modality", choices=["opt", "sar"], default="opt",
                   help="--format timm: whose patch embedding the timm model gets")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("embed", help="embeddings of a folder of images, or a feature-map GeoTIFF of a scene",
                       description="A folder: one embedding per image (mean of the final tokens at the encoder's "
                                   "input size; both: root/opt + root/sar pairs, optical then SAR) to "
                                   "OUT/embeddings.parquet (with pyarrow) or OUT/embeddings.npy, and OUT/index.csv. "
                                   "A scene (GeoTIFF, or any GDAL-readable source with the geo extra): "
                                   "OUT/<scene>_features.tif, one band per feature on the patch grid (same CRS, "
                                   "transform scaled by the patch size, NaN where a patch is all nodata), "
                                   "computed window by window with overlap. Pixels are scaled to [0, 1] as "
                                   "sources' 'auto' scaling does (8-bit / 255, 16-bit / 10000, floats as they are).")
    p.add_argument("--checkpoint", required=True, help="a pretraining checkpoint or an export folder")
    p.add_argument("--input", required=True, help="a folder of images, or a scene file")
    p.add_argument("--modality", choices=["opt", "sar", "both"], required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--batch-size", type=positive_int, help="images (folder) or windows (scene) per batch "
                                                           "(default: 32 / 8)")
    p.add_argument("--tile", type=positive_int, help="scene window in pixels (default: the encoder's input size)")
    p.add_argument("--overlap", type=non_negative_int,
                   help="scene window overlap in pixels, a multiple of the patch size (default: half the tile)")
    add_device_arg(p)
    p.set_defaults(func=cmd_embed)

    p = sub.add_parser("convert", help="turn published weights (CoDe-MAE authors', ImageNet iTPN) into codemae's",
                       description="Reads a published file (its 'model' entry; argparse settings allowed, nothing "
                                   "else unpickled), infers the config from its tensors, maps every tensor to "
                                   "codemae's name (an unplaceable or missing one is an error) and writes what loads "
                                   "strictly. Pretraining can also start from the ImageNet-1K iTPN file directly: "
                                   "model.init=itpn-imagenet:<file>.")
    p.add_argument("--from", dest="source", required=True,
                   choices=["codemae-official", "codemae-official-classifier", "itpn-imagenet"],
                   help="codemae-official: a pretraining checkpoint -> a codemae checkpoint (.pt); "
                        "codemae-official-classifier: a fine-tuned classifier -> a folder for codemae classify; "
                        "itpn-imagenet: the ImageNet-1K iTPN weights -> an encoder export folder")
    p.add_argument("--checkpoint", required=True, help="e.g. INP_dec8share_dino_pixC_CA_800E/checkpoint-800.pth")
    p.add_argument("--out", required=True, help="what to write (see --from)")
    p.add_argument("overrides", nargs="*", help="settle what tensors cannot tell, e.g. method.cdr_target=mgf")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("classify", help="score a converted published classifier on class folders",
                       description="Overall and per-class accuracy of a classifier written by codemae convert "
                                   "--from codemae-official-classifier, on <data>/<class>/<image>.")
    p.add_argument("--classifier", required=True, help="the folder codemae convert wrote")
    p.add_argument("--data", required=True, help="<class>/<image> folders")
    p.add_argument("--modality", choices=["opt", "sar"], required=True)
    p.add_argument("--mean", type=finite_float, nargs="+",
                   help="the fine-tuning normalisation (default: the data's own)")
    p.add_argument("--std", type=positive_float, nargs="+")
    p.add_argument("--centre-crop", type=positive_int, help="centre-crop to this many pixels before resizing")
    p.add_argument("--out", help="also write the result as JSON here")
    add_device_arg(p)
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("teacher-cache", help="run the OKD teacher once over the data and store its features",
                       description="Writes the teacher's patch features of every optical image of the "
                                   "config's sources to method.teacher.cache; pretraining with that "
                                   "setting then reads them instead of running the teacher.")
    p.add_argument("--config", required=True, help="the pretraining config (sources and teacher)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.teacher.cache=/data/cache")
    p.add_argument("--batch-size", type=positive_int, default=16)
    add_device_arg(p)
    p.set_defaults(func=cmd_teacher_cache)

    def encoder_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--checkpoint", help="any codemae checkpoint (its config comes with it)")
        group.add_argument("--random", metavar="CONFIG", help="a randomly initialised encoder of this config (the floor)")
        p.add_argument("--out", help="write the results as JSON here")
        add_device_arg(p)
        return group

    def labelled_args(p: argparse.ArgumentParser) -> argparse._MutuallyExclusiveGroup:
        group = encoder_args(p)
        p.add_argument("--data",
                       help="class-folder tree (<class>/<image>), a paired folder with --labels, or 'synthetic'")
        p.add_argument("--train", metavar="DIR|LIST",
                       help="the dataset's own training set: a folder laid out like --data, or a split-list file of "
                            "sample paths relative to --data (one a line); without --train/--test, --data is "
                            "re-split 60/20/20 (stratified, seed 0)")
        p.add_argument("--test", metavar="DIR|LIST", help="the dataset's own test set, as --train")
        p.add_argument("--val", metavar="DIR|LIST", help="optional validation set, as --train (honest results "
                                                         "select on it; without it, the last epoch)")
        p.add_argument("--labels", help="CSV stem,label (';'-separated labels: multi-label) for a paired folder")
        p.add_argument("--masks", help="folder of per-pixel label rasters (same stems) for a paired folder: "
                                       "multi-label by the 10%%-of-pixels rule")
        p.add_argument("--nodata", type=int, default=-1, help="label value to ignore in --masks")
        p.add_argument("--modality", choices=["opt", "sar", "both"], default="opt")
        p.add_argument("--shots", type=non_negative_int,
                       help="K-shot training set (0: the whole training set; default: 10 on the re-split, 0 "
                            "with --train)")
        p.add_argument("--kshot", choices=["balanced", "random"], default="balanced",
                       help="K per class, or K x classes at random (the reference code's 'K-shot')")
        seed_args(p, 5, "each with its own K-shot draw")
        p.add_argument("--centre-crop", type=positive_int, help="centre-crop to this many pixels before resizing")
        p.add_argument("--synthetic-n", type=positive_int, default=400, help="scenes for --data synthetic")
        p.add_argument("--synthetic-size", type=positive_int, default=96)
        p.add_argument("--multilabel", action="store_true",
                       help="synthetic: classes covering >= 10%% of pixels instead of the dominant class")
        return group

    p = sub.add_parser("probe", help="linear probe on frozen features (honest and reference protocols)",
                       description="The paper's linear probe: frozen encoder, mean-pooled tokens, LN -> "
                                   "BatchNorm1d (no affine) -> Linear, SGD lr 0.5, 50 epochs, cosine. Reports the "
                                   "honest protocol (epoch chosen on validation, or the last without one; test "
                                   "evaluated once) and the reference one (best of the test evaluations every 5 "
                                   "epochs), mean +- std over seeds; weighted P/R/F1 (single-label) or macro mAP.")
    labelled_args(p)
    p.add_argument("--protocol", choices=["codemae-linear", "fusmae-linear"], default="codemae-linear",
                   help="codemae-linear: the above; fusmae-linear: Fus-MAE's linear evaluation (plain Linear "
                        "head, AdamW, 20 epochs, batch 128, 1%% of the training labels)")
    p.add_argument("--epochs", type=positive_int, help="override the protocol's epochs (50 / 20)")
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("knn", help="k-NN accuracy on frozen features")
    labelled_args(p)
    p.add_argument("--k", type=positive_int, default=20)
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("finetune", help="fine-tuning of the whole encoder by the published recipes",
                       description="Fine-tunes encoder + fc_norm [+ BatchNorm] + linear head per seed on its own "
                                   "K-shot draw (AdamW, layer-wise lr decay, drop path; the optical recipe adds "
                                   "RandAugment, mixup/cutmix, RandomErasing). Reports the honest result (validation-"
                                   "selected, or the last epoch) and the reference one (best of the test "
                                   "evaluations at epoch 1 and every 5 epochs).")
    labelled_args(p).add_argument("--cnn", type=positive_int, metavar="PX",
                                  help="a small CNN trained from scratch at this input size instead of an encoder "
                                       "(the practitioner's baseline, same K-shot draws and recipe)")
    p.add_argument("--protocol", choices=["sar-target", "sar-acd", "optical-scene", "multilabel"],
                   default="sar-target", help="the published recipe (docs/protocols.md)")
    p.add_argument("--layer-decay", type=positive_float,
                   help="override the protocol's layer-wise lr decay (AID 0.85, RESISC45 0.95)")
    p.add_argument("--epochs", type=positive_int, help="override the protocol's epochs (for quick checks)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("merge", help="one result from the JSON results of one evaluation run over disjoint seeds",
                       description="Merges the --out results of probe, knn, finetune, segment, damage or detect runs "
                                   "that differ only in --seeds / --first-seed (seeds split over cores or machines) "
                                   "into one: mean +- std over all their seeds, in seed order.")
    p.add_argument("results", nargs="+", help="the JSON results")
    p.add_argument("--out", required=True, help="the merged JSON result")
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("split-lists", help="write a seeded, class-stratified split of a class-folder tree as lists",
                       description="Writes <out>/train.txt, val.txt and test.txt (image paths relative to --data, "
                                   "one a line; a zero fraction writes no list) for --train/--val/--test of probe, "
                                   "knn and finetune, when a dataset has no official split of its own.")
    p.add_argument("--data", required=True, help="class-folder tree (<class>/<image>)")
    p.add_argument("--out", required=True, help="folder for the lists (keep it out of the repository, e.g. runs/)")
    p.add_argument("--fractions", type=finite_float, nargs=3, default=[0.6, 0.2, 0.2], metavar=("TRAIN", "VAL", "TEST"))
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.set_defaults(func=cmd_split_lists)

    p = sub.add_parser("segment", help="segmentation with an UperNet (or light) head on the feature pyramid (mIoU)",
                       description="Trains a segmentation head (mmseg's UperNet on strides 4-32, or the light head) "
                                   "on the encoder's pyramid, frozen or fine-tuned (--finetune-encoder) with the "
                                   "papers' LoveDA recipe: AdamW, layer-wise lr decay, drop path, warm-up + poly "
                                   "schedule, random crops; tests by sliding windows. Data: synthetic scenes, one "
                                   "co-registered scene (top rows train, the rest test) or a paired folder with "
                                   "label rasters and optional split lists. Statistics from the training images "
                                   "only; mIoU ignores no-data.")
    encoder_args(p)
    p.add_argument("--scene", nargs=3, metavar=("OPT", "SAR", "MASK"), help="one scene's files (default: synthetic)")
    p.add_argument("--data", help="a paired folder, with --masks: a folder of label rasters of the same stems")
    p.add_argument("--masks", help="label rasters for --data")
    p.add_argument("--train", metavar="LIST", help="split list (one stem per line) of the training images of --data")
    p.add_argument("--test", metavar="LIST", help="split list of the test images (with --train)")
    p.add_argument("--val", metavar="LIST", help="optional split list of validation images (mIoU reported beside)")
    p.add_argument("--modality", choices=["opt", "sar", "both"], default="both")
    p.add_argument("--opt-bands", type=non_negative_int, nargs="+",
                   help="optical band indices, e.g. 3 2 1 for S2 RGB")
    p.add_argument("--sar-bands", type=non_negative_int, nargs="+", help="SAR band indices, e.g. 1 for VH")
    p.add_argument("--opt-max", type=positive_float, default=10000.0, help="integer optical values / this -> [0, 1]")
    p.add_argument("--sar-db", type=finite_float, nargs=2, default=[-25.0, 0.0], metavar=("LO", "HI"))
    p.add_argument("--nodata", type=int, default=-1, help="label value to ignore")
    p.add_argument("--head", choices=["upernet", "light"], default="light",
                   help="decode head: light (64 channels, 15-30x faster on CPU) or upernet (the papers' head, "
                        "mmseg's UPerHead, 512 channels)")
    p.add_argument("--channels", type=positive_int, help="head width (default: 512 upernet, 64 light)")
    p.add_argument("--aux-head", action="store_true", help="mmseg's auxiliary FCN head on stride 16, loss x 0.4")
    p.add_argument("--finetune-encoder", action="store_true", help="train the encoder too (the papers' protocol)")
    p.add_argument("--lr", type=positive_float, default=3e-5, help="base learning rate (LoveDA: 3e-5)")
    p.add_argument("--layer-decay", type=positive_float, default=0.85, help="layer-wise lr decay (LoveDA: 0.85)")
    p.add_argument("--weight-decay", type=finite_float, default=0.05)
    p.add_argument("--drop-path", type=finite_float, default=0.15, help="encoder drop path when fine-tuned")
    p.add_argument("--iters", type=positive_int, default=10_000, help="training iterations (LoveDA: 10k)")
    p.add_argument("--warmup-iters", type=non_negative_int,
                   help="linear warm-up iterations (default: 5%% of --iters, LoveDA: 500 of 10k)")
    p.add_argument("--power", type=positive_float, default=1.0, help="poly schedule power")
    p.add_argument("--min-lr", type=finite_float, default=0.0, help="poly schedule floor")
    p.add_argument("--batch-size", type=positive_int, default=16, help="crops per iteration (LoveDA: 8 GPUs x 2)")
    p.add_argument("--crop", type=positive_int, default=512,
                   help="training crop and test window in px (lowered to the smallest training image)")
    p.add_argument("--stride", type=positive_int, help="sliding-window stride (default: half the crop)")
    seed_args(p, 3, "init and shuffling")
    p.add_argument("--train-fraction", type=fraction, default=0.5,
                   help="without split lists: the first fraction of the samples (of a scene's rows) trains")
    p.add_argument("--synthetic-n", type=positive_int, default=80)
    p.add_argument("--synthetic-size", type=positive_int, help="synthetic scene size (default: the model's input)")
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("damage", help="bi-temporal building damage assessment, optical pre / SAR post (BRIGHT)",
                       description="Fine-tunes a Siamese model (the shared encoder on the optical pre-event and the "
                                   "SAR post-event image, per-level fusion, FPN head; layer-wise lr decay) on the "
                                   "train list of a BRIGHT-layout folder, predicts val and test scenes by sliding "
                                   "windows and reports mIoU, per-class IoU and the xView2 F1 scores (docs/damage.md).")
    encoder_args(p)
    p.add_argument("--data", required=True, help="folder with pre-event/, post-event/, target/ and train/val/test.txt")
    p.add_argument("--epochs", type=positive_int, default=20)
    seed_args(p, 3, "init and shuffling")
    p.add_argument("--img-size", type=positive_int, help="crop / window size (default: the encoder's input size)")
    p.add_argument("--batch-size", type=positive_int, default=8)
    p.add_argument("--crops-per-scene", type=positive_int, default=4, help="random training crops per scene and epoch")
    p.add_argument("--lr", type=positive_float, default=1e-3, help="peak lr of the decoder (encoder layers decayed)")
    p.set_defaults(func=cmd_damage)

    p = sub.add_parser("synth", help="write generated data in the layout a task reads (e.g. --task damage)",
                       description="damage: bi-temporal optical-before / SAR-after pairs with damage labels in the "
                                   "BRIGHT layout and train/val/test lists; scenes: paired opt/ sar/ PNGs with "
                                   "land-cover labels/. Deterministic by --seed.")
    p.add_argument("--task", choices=["damage", "scenes"], required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--n", type=positive_int, default=40, help="number of scenes")
    p.add_argument("--size", type=positive_int, default=256, help="scene size in pixels")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of the first scene (scene i uses seed + i)")
    p.set_defaults(func=cmd_synth)

    p = sub.add_parser("detect", help="object detection: Faster R-CNN on the encoder's pyramid (mAP, VOC / COCO)",
                       description="Fine-tunes torchvision's Faster R-CNN on the encoder turned into an FPN (HiViT: "
                                   "the iTPN levels at strides 4, 8, 16, pooled to 32; ViT: a simple feature pyramid) "
                                   "with layer-wise lr decay and drop path, per seed; COCO-style mAP50, mAP50:95 and "
                                   "per-class AP50 on the test list (docs/detection.md).")
    encoder_args(p)
    p.add_argument("--data", required=True, help="VOC: the folder with Annotations/, JPEGImages/, ImageSets/Main/; "
                                                 "COCO: the folder the file_names are relative to")
    p.add_argument("--format", choices=["voc", "coco"], default="voc")
    p.add_argument("--modality", choices=["opt", "sar"], required=True, help="the patch embedding the images go through")
    split = p.add_mutually_exclusive_group()
    split.add_argument("--train-split", metavar="NAME", help="VOC: ImageSets/Main/NAME.txt (default trainval)")
    split.add_argument("--train", metavar="LIST", help="VOC: a list file of image ids; COCO: the training JSON")
    p.add_argument("--test", metavar="LIST", help="VOC: a list file of image ids; COCO: the test JSON (default: a "
                                                  "fixed seeded 80/20 split of the training list, flip twins together)")
    p.add_argument("--classes", help="comma-separated class names (default: COCO categories, else the training "
                                     "set's names sorted)")
    p.add_argument("--schedule", choices=["1x", "3x"], default="1x", help="12 epochs, lr steps 8, 11 / 36 epochs, 27, 33")
    p.add_argument("--epochs", type=positive_int, help="run this many epochs, the lr steps scaled to it")
    seed_args(p, 3, "init and shuffling; the split is fixed")
    p.add_argument("--img-size", type=positive_int, default=512, help="square input size, a multiple of 32")
    p.add_argument("--multiscale", action="store_true", help="train at a random size of 0.75-1.25 x --img-size")
    p.add_argument("--batch-size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=3e-4, help="peak lr at batch 16, scaled linearly to the batch")
    p.add_argument("--fpn-width", type=positive_int, default=256, help="FPN channels")
    p.add_argument("--box-head", choices=["4conv1fc", "2fc"], default="4conv1fc",
                   help="the authors' 4-conv + 1-fc box head, or torchvision's cheaper 2-fc one")
    p.add_argument("--rois-per-image", type=positive_int, default=512, help="RoIs sampled per image for the box head")
    p.set_defaults(func=cmd_detect)

    def analysis_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pairs", required=True, help="paired folder (opt/, sar/, optional tiles.csv), or 'synthetic'")
        p.add_argument("--split", help="only this split of the pairs' split CSV")
        p.add_argument("--pairs-n", type=positive_int, default=200,
                       help="at most this many pairs (the first ones) and --images (spread evenly over them)")
        p.add_argument("--images", metavar="DIR", help="unpaired images of one modality (e.g. SAR target chips, "
                                                         "any image tree) whose reconstructions are measured too")
        p.add_argument("--images-modality", choices=["opt", "sar"], default="sar", help="the modality of --images")
        p.add_argument("--images-list", metavar="LIST", help="only these images of --images: a split list "
                                                               "(paths relative to --images, one a line)")
        p.add_argument("--out", required=True, help="folder for index.html, the PNGs and report.json")
        add_device_arg(p)

    p = sub.add_parser("analyze", help="mechanism analyses of one checkpoint as PNGs and an HTML report",
                       description="Singular value spectrum and effective rank (optical, SAR, joint), paired "
                                   "embedding projection (UMAP, or PCA without the analysis extra), patch alignment "
                                   "vs SSIM, reconstructions (self and, for CDR checkpoints, from SAR).")
    p.add_argument("--checkpoint", required=True)
    analysis_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("compare", help="the analyses of several checkpoints side by side",
                       description="Spectra on one plot, a table of effective ranks, alignment curves together.")
    p.add_argument("checkpoints", nargs="+")
    analysis_args(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("retrieval", help="cross-modal retrieval optical<->SAR on co-registered pairs",
                       description="R@1, R@5 and median rank, optical->SAR and SAR->optical, each modality "
                                   "encoded on its own and mean-pooled.")
    encoder_args(p)
    p.add_argument("--pairs", required=True, help="paired folder (opt/, sar/, optional tiles.csv), or 'synthetic'")
    p.add_argument("--split", help="only this split of the pairs' split CSV")
    p.add_argument("--synthetic-n", type=positive_int, default=200, help="pairs for --pairs synthetic")
    p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("bench", help="training throughput, step time, memory and FLOP/s utilisation",
                       description="Times joint-MAE training steps fed by the data pipeline (data / forward / "
                                   "backward / optimiser), compares the achieved FLOP/s with a large matmul on the "
                                   "same device, and times the data pipeline alone with 0, 1 and 2 workers. On a "
                                   "GPU also bf16 and CUDA peak memory.")
    p.add_argument("--backbones", nargs="+", default=["vit_tiny", "hivit_tiny"])
    p.add_argument("--img-size", type=positive_int, default=128)
    p.add_argument("--batch-size", type=positive_int, default=32, help="pairs per step")
    p.add_argument("--steps", type=positive_int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=positive_int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="loader workers feeding the timed steps")
    p.add_argument("--out", help="also write the results as JSON here")
    p.add_argument("--compile", action="store_true", help="torch.compile codemae's transformer blocks (train.compile)")
    p.add_argument("--against-official", metavar="MAE_SRC_DIR",
                   help="instead: time the official MAE (facebookresearch/mae models_mae.py in this local folder; "
                        "needs timm) against codemae's joint MAE at equal work, the ViT-Tiny/16 config of "
                        "--img-size with 2 x --batch-size images, alternating --steps rounds in this process")
    p.set_defaults(func=cmd_bench)
    return parser


FOLDER_OUTPUTS = ("analyze", "compare", "export", "shard", "synth", "embed", "split-lists")


def check_output(path: str, folder: bool) -> None:
    """Refuse, before any work, an output that cannot be written: a file where a folder is wanted (or the
    reverse), or a place whose nearest existing folder is not writable."""
    target = Path(path)
    if target.exists() and target.is_dir() != folder:
        raise ConfigError(f"--out {path}: exists and is a {'file' if folder else 'folder'}; "
                          f"a {'folder' if folder else 'file'} is written there")
    existing = target if folder and target.is_dir() else target.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise ConfigError(f"--out {path}: {existing} is not a writable folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "out", None):
            folder = args.command in FOLDER_OUTPUTS or getattr(args, "source", "") in (
                "codemae-official-classifier", "itpn-imagenet")
            check_output(args.out, folder)
        return args.func(args)
    except CodemaeError as err:
        print(f"codemae: error: {one_line(err)}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        print("codemae: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
