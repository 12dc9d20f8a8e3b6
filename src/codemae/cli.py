"""The ``codemae`` command: one entry point, one subcommand per task."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from codemae.errors import CodemaeError, ConfigError, one_line


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


def cmd_teacher_cache(args: argparse.Namespace) -> int:
    import torch

    from codemae.config import load_config
    from codemae.data.pipeline import build_sources
    from codemae.loading import build_teacher
    from codemae.train.teacher_features import write_teacher_cache

    cfg = load_config(args.config, args.overrides)
    teacher_cfg = cfg.method.teacher
    if not teacher_cfg.cache:
        raise ConfigError("config key 'method.teacher.cache': the folder to write the features to is not set")
    teacher = build_teacher(teacher_cfg)
    if teacher is None:
        raise ConfigError("config key 'method.teacher.kind': none; choose hf, hub or checkpoint")
    teacher.to("cuda" if torch.cuda.is_available() else "cpu")
    size = teacher_cfg.input_size or cfg.model.img_size
    for source in build_sources(cfg.data, cfg.model.channels):
        if "opt" in source.modalities:
            path = write_teacher_cache(teacher, source, teacher_cfg.cache, size, args.batch_size)
            print(f"wrote {path} ({len(source)} images)")
    return 0


def labelled_data(args: argparse.Namespace, channels: dict[str, int]):
    """The labelled set named by --data (a class-folder tree, a paired folder with --labels, or 'synthetic')."""
    from codemae.eval.data import class_folders, paired_with_labels, paired_with_masks, synthetic_scenes

    if args.data == "synthetic":
        return synthetic_scenes(args.synthetic_n, args.synthetic_size, 100_000, channels, args.multilabel)
    if args.masks:
        return paired_with_masks(args.data, args.masks, channels, args.nodata)
    if args.labels:
        return paired_with_labels(args.data, args.labels, channels)
    if args.modality == "both":
        raise ConfigError("--modality both needs paired data: give --labels with a paired folder, or --data synthetic")
    return class_folders(args.data, args.modality, channels)


def evaluation_setup(args: argparse.Namespace):
    from codemae.eval.features import method_to_evaluate

    method = method_to_evaluate(args.checkpoint, args.random)
    return method, labelled_data(args, method.encoder.channels)


def seeds_of(args: argparse.Namespace) -> list[int]:
    return list(range(args.seeds))


def finish(title: str, result: dict, args: argparse.Namespace) -> int:
    from codemae.eval.report import print_table, write_json

    print_table(title, result["summary"], args.seeds)
    write_json(args.out, {"command": sys.argv[1:], **result})
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from codemae.eval.protocols import run_probe

    method, data = evaluation_setup(args)
    result = run_probe(method, data, args.modality, args.shots, args.kshot, seeds_of(args), args.centre_crop,
                       args.epochs)
    shots = f"{args.shots}-shot ({args.kshot})" if args.shots > 0 else "full pool"
    title = (f"linear probe, {args.modality}, {shots}, {result['metric']} %, train {result['train_size']} / "
             f"val {result['val_size']} / test {result['test_size']}")
    return finish(title, result, args)


def cmd_knn(args: argparse.Namespace) -> int:
    from codemae.eval.protocols import run_knn

    method, data = evaluation_setup(args)
    result = run_knn(method, data, args.modality, args.shots, args.kshot, seeds_of(args), args.k, args.centre_crop)
    return finish(f"k-NN, {args.modality}, test {result['test_size']}", result, args)


def cmd_finetune(args: argparse.Namespace) -> int:
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.finetune import PROTOCOLS, run_finetune

    protocol = PROTOCOLS[args.protocol]
    if args.epochs:
        protocol = dataclasses.replace(protocol, epochs=args.epochs)
    load = lambda: method_to_evaluate(args.checkpoint, args.random, drop_path=protocol.drop_path)  # noqa: E731
    data = labelled_data(args, load().encoder.channels)
    result = run_finetune(load, data, args.modality, args.shots, args.kshot, seeds_of(args), protocol)
    title = (f"fine-tuning ({args.protocol}), {args.modality}, {args.shots}-shot ({args.kshot}), "
             f"{protocol.epochs} epochs, train {result['train_size']} / test {result['test_size']}")
    return finish(title, result, args)


def cmd_segment(args: argparse.Namespace) -> int:
    from codemae.config import ScalingConfig
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.segmentation import folder_segmentation, run_segmentation, scene_tiles, synthetic_segmentation

    load = lambda: method_to_evaluate(args.checkpoint, args.random)  # noqa: E731
    method = load()
    size = method.encoder.img_size
    if args.masks:
        data = folder_segmentation(args.data, args.masks, size, method.encoder.channels, args.nodata)
    elif args.scene:
        opt, sar, mask = args.scene
        scaling = {"opt": ScalingConfig(max_value=args.opt_max), "sar": ScalingConfig(mode="db", db_range=args.sar_db)}
        data = scene_tiles({"opt": opt, "sar": sar}, mask, args.tile or size, method.encoder.channels,
                           {"opt": args.opt_bands, "sar": args.sar_bands}, scaling, args.nodata)
    else:
        data = synthetic_segmentation(args.synthetic_n, size, 200_000, method.encoder.channels)
    result = run_segmentation(load, data, args.modality, args.finetune_encoder, args.epochs, seeds_of(args),
                              args.train_fraction)
    mode = "fine-tuned" if args.finetune_encoder else "frozen"
    title = (f"segmentation, {args.modality}, {mode} encoder, {args.epochs} epochs, train {result['train_tiles']} / "
             f"test {result['test_tiles']} tiles, classes {', '.join(result['classes'])}")
    return finish(title, result, args)


def cmd_analyze(args: argparse.Namespace) -> int:
    from pathlib import Path

    from codemae.analysis.collect import collect
    from codemae.analysis.report import Analysis, write_report
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.protocols import paired_source

    checkpoints = args.checkpoints if args.command == "compare" else [args.checkpoint]
    analyses, patch = [], 16
    for ckpt in checkpoints:
        method = method_to_evaluate(ckpt)
        source = paired_source(args.pairs, args.split, method.encoder.channels, args.pairs_n)
        patch = method.encoder.patch_size
        name = Path(ckpt).parent.parent.name if Path(ckpt).parent.name == "checkpoints" else Path(ckpt).stem
        analyses.append(Analysis.of(name, collect(method, source, args.pairs_n)))
    page = write_report(analyses, Path(args.out), f"{args.pairs} ({args.split or 'all'})", patch)
    print(f"report: {page}")
    return 0


def cmd_retrieval(args: argparse.Namespace) -> int:
    from codemae.eval.features import method_to_evaluate
    from codemae.eval.protocols import paired_source, run_retrieval
    from codemae.eval.report import write_json
    from codemae.eval.retrieval import random_expectation

    method = method_to_evaluate(args.checkpoint, args.random)
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
    from codemae.export import export_encoder

    out = export_encoder(args.checkpoint, args.out)
    print(f"wrote {out} (encoder.safetensors, config.json); load it with codemae.load_encoder('{out}')")
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

    model = load_classifier(args.classifier)
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

    run_bench(args.backbones, args.img_size, args.batch_size, args.steps, args.threads, args.out, args.workers)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="codemae", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

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
    p.add_argument("--db-range", type=float, nargs=2, default=(-25.0, 0.0), metavar=("LO", "HI"))
    p.add_argument("--opt-channels", type=int, default=3)
    p.add_argument("--sar-channels", type=int, default=1)
    p.add_argument("--samples", type=int, default=1024, help="at most this many evenly spaced samples")
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
    p.add_argument("--workers", type=int, default=8, help="threads reading headers")
    p.set_defaults(func=cmd_data_check)

    p = sub.add_parser("shard", help="convert folder sources into WebDataset tar shards with a manifest",
                       description="Writes <out>/<source>/shard-NNNNNN.tar per source (paired and unpaired apart) "
                                   "and <out>/manifest.json with statistics, counts and SHA-256 checksums.")
    p.add_argument("--source", required=True, help="config whose data.sources to shard")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. data.root=/datasets/OSPretrain")
    p.set_defaults(func=cmd_shard)

    p = sub.add_parser("export", help="write a checkpoint's encoder as safetensors + config.json",
                       description="The weights encode() needs (no optimiser state, no decoders) as "
                                   "safetensors, loadable with codemae.load_encoder(DIR).")
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--out", required=True, help="output folder")
    p.set_defaults(func=cmd_export)

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
    p.add_argument("--mean", type=float, nargs="+", help="the fine-tuning normalisation (default: the data's own)")
    p.add_argument("--std", type=float, nargs="+")
    p.add_argument("--centre-crop", type=int, help="centre-crop to this many pixels before resizing")
    p.add_argument("--out", help="also write the result as JSON here")
    p.set_defaults(func=cmd_classify)

    p = sub.add_parser("teacher-cache", help="run the OKD teacher once over the data and store its features",
                       description="Writes the teacher's patch features of every optical image of the "
                                   "config's sources to method.teacher.cache; pretraining with that "
                                   "setting then reads them instead of running the teacher.")
    p.add_argument("--config", required=True, help="the pretraining config (sources and teacher)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. method.teacher.cache=/data/cache")
    p.add_argument("--batch-size", type=int, default=16)
    p.set_defaults(func=cmd_teacher_cache)

    def encoder_args(p: argparse.ArgumentParser) -> None:
        group = p.add_mutually_exclusive_group(required=True)
        group.add_argument("--checkpoint", help="any codemae checkpoint (its config comes with it)")
        group.add_argument("--random", metavar="CONFIG", help="a randomly initialised encoder of this config (the floor)")
        p.add_argument("--out", help="write the results as JSON here")

    def labelled_args(p: argparse.ArgumentParser) -> None:
        encoder_args(p)
        p.add_argument("--data", required=True,
                       help="class-folder tree (<class>/<image>), a paired folder with --labels, or 'synthetic'")
        p.add_argument("--labels", help="CSV stem,label (';'-separated labels: multi-label) for a paired folder")
        p.add_argument("--masks", help="folder of per-pixel label rasters (same stems) for a paired folder: "
                                       "multi-label by the 10%%-of-pixels rule")
        p.add_argument("--nodata", type=int, default=-1, help="label value to ignore in --masks")
        p.add_argument("--modality", choices=["opt", "sar", "both"], default="opt")
        p.add_argument("--shots", type=int, default=10, help="K-shot training set (0: the whole training pool)")
        p.add_argument("--kshot", choices=["balanced", "random"], default="balanced",
                       help="K per class, or K x classes at random (the reference code's 'K-shot')")
        p.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1, each with its own K-shot draw")
        p.add_argument("--centre-crop", type=int, help="centre-crop to this many pixels before resizing")
        p.add_argument("--synthetic-n", type=int, default=400, help="scenes for --data synthetic")
        p.add_argument("--synthetic-size", type=int, default=96)
        p.add_argument("--multilabel", action="store_true",
                       help="synthetic: classes covering >= 10%% of pixels instead of the dominant class")

    p = sub.add_parser("probe", help="linear probe on frozen features (honest and reference protocols)",
                       description="The paper's linear probe: frozen encoder, mean-pooled tokens, LN -> "
                                   "BatchNorm1d (no affine) -> Linear, SGD lr 0.5, 50 epochs, cosine. Reports the "
                                   "honest protocol (epoch chosen on validation, test evaluated once) and the "
                                   "reference one (best test epoch), mean +- std over seeds.")
    labelled_args(p)
    p.add_argument("--epochs", type=int, default=50)
    p.set_defaults(func=cmd_probe)

    p = sub.add_parser("knn", help="k-NN accuracy on frozen features")
    labelled_args(p)
    p.add_argument("--k", type=int, default=20)
    p.set_defaults(func=cmd_knn)

    p = sub.add_parser("finetune", help="few-shot fine-tuning of the whole encoder (SAR target / optical scene)",
                       description="Fine-tunes encoder + BatchNorm + linear head per seed on its own K-shot draw "
                                   "(AdamW, layer-wise lr decay, drop path); test accuracy after the last epoch.")
    labelled_args(p)
    p.add_argument("--protocol", choices=["sar-target", "optical-scene"], default="sar-target")
    p.add_argument("--epochs", type=int, help="override the protocol's epochs (for quick checks)")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("segment", help="segmentation with a UperNet-style head on the feature pyramid (mIoU)",
                       description="Trains a light UperNet-style head on the encoder's pyramid levels (frozen, or "
                                   "fine-tuned with --finetune-encoder) on synthetic scenes or on the tiles of one "
                                   "co-registered scene (top part train, bottom part test); mIoU ignores no-data.")
    encoder_args(p)
    p.add_argument("--scene", nargs=3, metavar=("OPT", "SAR", "MASK"), help="one scene's files (default: synthetic)")
    p.add_argument("--data", help="a paired folder, with --masks: a folder of label rasters of the same stems")
    p.add_argument("--masks", help="label rasters for --data")
    p.add_argument("--modality", choices=["opt", "sar", "both"], default="both")
    p.add_argument("--tile", type=int, help="tile size in pixels (default: the model's input size)")
    p.add_argument("--opt-bands", type=int, nargs="+", help="optical band indices, e.g. 3 2 1 for S2 RGB")
    p.add_argument("--sar-bands", type=int, nargs="+", help="SAR band indices, e.g. 1 for VH")
    p.add_argument("--opt-max", type=float, default=10000.0, help="integer optical values / this -> [0, 1]")
    p.add_argument("--sar-db", type=float, nargs=2, default=[-25.0, 0.0], metavar=("LO", "HI"))
    p.add_argument("--nodata", type=int, default=-1, help="label value to ignore")
    p.add_argument("--finetune-encoder", action="store_true")
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-fraction", type=float, default=0.5)
    p.add_argument("--synthetic-n", type=int, default=80)
    p.set_defaults(func=cmd_segment)

    def analysis_args(p: argparse.ArgumentParser) -> None:
        p.add_argument("--pairs", required=True, help="paired folder (opt/, sar/, optional tiles.csv), or 'synthetic'")
        p.add_argument("--split", help="only this split of the pairs' split CSV")
        p.add_argument("--pairs-n", type=int, default=200, help="at most this many pairs")
        p.add_argument("--out", required=True, help="folder for index.html, the PNGs and report.json")

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
    p.add_argument("--synthetic-n", type=int, default=200, help="pairs for --pairs synthetic")
    p.set_defaults(func=cmd_retrieval)

    p = sub.add_parser("bench", help="training throughput, step time, memory and FLOP/s utilisation",
                       description="Times joint-MAE training steps fed by the data pipeline (data / forward / "
                                   "backward / optimiser), compares the achieved FLOP/s with a large matmul on the "
                                   "same device, and times the data pipeline alone with 0, 1 and 2 workers. On a "
                                   "GPU also bf16 and CUDA peak memory.")
    p.add_argument("--backbones", nargs="+", default=["vit_tiny", "hivit_tiny"])
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=32, help="pairs per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (after 2 warm-up steps)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    p.add_argument("--workers", type=int, default=2, help="loader workers feeding the timed steps")
    p.add_argument("--out", help="also write the results as JSON here")
    p.set_defaults(func=cmd_bench)
    return parser


FOLDER_OUTPUTS = ("analyze", "compare", "export", "shard")


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
