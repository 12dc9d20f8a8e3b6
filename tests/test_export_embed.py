"""Encoder exports (codemae, timm, Hugging Face formats), load_encoder's normalisation and ``codemae embed``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import codemae
from codemae.cli import main
from codemae.checkpoint import LAYOUT, save_atomic
from codemae.config import to_dict
from codemae.data.pipeline import source_fingerprint
from codemae.data.sources import build_source
from codemae.data.stats import compute_stats, load_stats, save_stats
from codemae.export import WEIGHTS, ExportedEncoder, export_encoder, load_export_method
from codemae.loading import load_method
from codemae.methods import build_method
from codemae.train.engine import pretrain
from conftest import tiny_config

VIT = {"backbone": "vit_tiny", "img_size": 32, "patch_size": 16, "embed_dim": 32, "depth": 2, "num_heads": 2}
CODEMAE = {"name": "codemae", "ccl": "cross_attention", "cdr": True}


def run(root: Path, model: dict | None = None, method: dict | None = None) -> Path:
    """A run folder as pretraining leaves it (checkpoints/last.pt at step 1, the cached statistics of its
    synthetic source), written directly so these tests do not depend on the trainer; the checkpoint."""
    cfg = tiny_config(root, model=model or VIT, method={"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2,
                                                        **(method or CODEMAE)})
    torch.manual_seed(0)
    source = build_source(cfg.data.sources[0], cfg.model.channels)
    stats = compute_stats(source, cfg.data.stats_samples)
    save_stats(stats, root / "stats" / f"synthetic-{source_fingerprint(source, cfg.data.sources[0])}.json", 8)
    ckpt = root / "checkpoints" / "last.pt"
    save_atomic({"model": build_method(cfg).state_dict(), "config": to_dict(cfg), "step": 1, "layout": LAYOUT}, ckpt)
    return ckpt


def test_the_run_folder_of_a_real_pretraining_gives_the_export_its_statistics(tmp_path):
    pretrain(tiny_config(tmp_path / "run", model=VIT, method={"decoder_dim": 32, "decoder_depth": 1,
                                                              "decoder_heads": 2}, train={"max_steps": 1}))
    ckpt = tmp_path / "run" / "checkpoints" / "last.pt"
    meta = codemae.load_encoder(str(export_encoder(ckpt, tmp_path / "enc"))).meta
    assert meta["normalisation"] == {m: vars(s) for m, s in run_stats(ckpt).items()} and meta["step"] == 1
    assert meta["run_summary"]["step"] == 1 and "finished at step 1 of" in (tmp_path / "enc" / "README.md").read_text()


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory) -> Path:
    return run(tmp_path_factory.mktemp("vit") / "run")


def images(channels: int, n: int = 2, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def run_stats(ckpt: Path) -> dict:
    """The statistics the run cached (one synthetic source)."""
    (path,) = (ckpt.parent.parent / "stats").glob("*.json")
    return load_stats(path, ("opt", "sar"))


def test_codemae_export_holds_the_encoder_alone_with_stats_bands_and_origin(vit_run, tmp_path):
    out = tmp_path / "enc"
    assert main(["export", "--checkpoint", str(vit_run), "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "encoder.safetensors"]
    meta = json.loads((out / "config.json").read_text())
    stats = run_stats(vit_run)
    assert meta["normalisation"] == {m: {"mean": s.mean, "std": s.std} for m, s in stats.items()}
    assert (meta["backbone"], meta["img_size"], meta["patch_size"], meta["channels"], meta["method"]) == \
        ("vit_tiny", 32, 16, {"opt": 3, "sar": 1}, "codemae")
    assert (meta["checkpoint"], meta["step"]) == (str(vit_run), 1)
    assert meta["band_names"] == {"opt": None, "sar": None}  # RGB / 1-band SAR: nothing recorded
    keys = set(load_file(str(out / "encoder.safetensors")))
    assert keys == {f"encoder.{k}" for k in load_method(vit_run).encoder.state_dict()} | \
        {"opt_mean", "opt_std", "sar_mean", "sar_std"}  # no decoder, CCL or CDR weights
    card = (out / "README.md").read_text()
    assert "codemae encoder (vit_tiny)" in card and str(stats["opt"].mean) in card


def test_load_encoder_applies_the_stored_statistics(vit_run, tmp_path):
    encoder = codemae.load_encoder(str(export_encoder(vit_run, tmp_path / "enc")))
    method, stats = load_method(vit_run), run_stats(vit_run)
    raw = {"opt": images(3), "sar": images(1, seed=1)}
    with torch.no_grad():
        for m, x in raw.items():
            expected = method.encode({m: stats[m](x[0])[None]})[m]  # Normalisation of one (C, H, W) image
            assert torch.allclose(encoder.tokens(x[:1], m), expected, atol=1e-6)
            assert torch.allclose(encoder(x[:1], m), expected.mean(1), atol=1e-6)
            assert encoder.feature_map(x, m).shape == (2, 32, 2, 2)
        # a raw image is not what the encoder sees: normalisation changes the features
        assert not torch.allclose(encoder(raw["opt"], "opt"), method.encode({"opt": raw["opt"]})["opt"].mean(1))


def test_timm_loads_the_timm_export_strictly_and_gives_the_same_features(vit_run, tmp_path):
    timm = pytest.importorskip("timm")
    for modality, channels in (("opt", 3), ("sar", 1)):
        out = tmp_path / modality
        assert main(["export", "--checkpoint", str(vit_run), "--out", str(out), "--format", "timm",
                     "--modality", modality]) == 0
        spec = json.loads((out / "config.json").read_text())["timm"]
        model = timm.create_model(spec["model_name"], pretrained=False, **spec["kwargs"]).eval()
        model.load_state_dict(load_file(str(out / "model.safetensors")), strict=True)
        x = images(channels)
        mean, std = (torch.tensor(spec[k]).view(-1, 1, 1) for k in ("mean", "std"))
        ours = codemae.load_encoder(str(export_encoder(vit_run, tmp_path / "c")))
        with torch.no_grad():
            assert torch.allclose(model((x - mean) / std), ours(x, modality), atol=1e-5)
            assert torch.allclose(model.forward_features((x - mean) / std), ours.tokens(x, modality), atol=1e-5)


@pytest.mark.parametrize("model, method", [
    ({"backbone": "hivit_tiny", "img_size": 32, "embed_dim": 32, "depth": 2, "num_heads": 2}, CODEMAE),
    (VIT, {"name": "fusmae", "fusion": "xaed", "masking": "independent"}),  # a ViT with a fusion block
])
def test_timm_format_refuses_encoders_timm_lacks_in_one_line(tmp_path, capsys, model, method):
    ckpt = run(tmp_path / "run", model=model, method=method)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "t"), "--format", "timm"]) == 2
    err = capsys.readouterr().err
    assert "has no timm counterpart" in err and len(err.strip().splitlines()) == 1


def test_hf_format_round_trip_gives_identical_features(vit_run, tmp_path):
    pytest.importorskip("huggingface_hub")
    out = export_encoder(vit_run, tmp_path / "hf", "hf")
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    hub = ExportedEncoder.from_pretrained(str(out)).eval()
    direct = codemae.load_encoder(str(export_encoder(vit_run, tmp_path / "c")))
    x = images(3)
    with torch.no_grad():
        assert torch.equal(hub(x, "opt"), direct(x, "opt"))
    assert hub.state_dict().keys() == load_file(str(out / "model.safetensors")).keys()
    assert codemae.load_encoder(str(out)).meta == hub.meta  # codemae reads the hf folder too


def test_export_without_recorded_statistics_says_so(tmp_path, capsys):
    ckpt = run(tmp_path / "run")
    for path in (tmp_path / "run" / "stats").iterdir():
        path.unlink()
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "enc")]) == 0
    assert "note: normalisation statistics opt: unknown" in capsys.readouterr().out
    encoder = codemae.load_encoder(str(tmp_path / "enc"))
    assert encoder.meta["normalisation"] == {"opt": None, "sar": None} and encoder.normalised == []
    assert "no statistics found for synthetic" in encoder.meta["normalisation_note"]
    x = images(3)
    with torch.no_grad():  # nothing to apply: raw images go in as they are
        assert torch.equal(encoder(x, "opt"), load_method(ckpt).encode({"opt": x})["opt"].mean(1))


def test_version_1_exports_still_load_without_statistics(vit_run, tmp_path):
    """Exports of the previous code (encoder.* weights, config with format/version 1/layout/config) load."""
    method = load_method(vit_run)
    out = tmp_path / "old"
    out.mkdir()
    save_file({k: v.contiguous() for k, v in method.state_dict().items() if k.startswith("encoder.")},
              str(out / "encoder.safetensors"))
    config = torch.load(vit_run, weights_only=True)["config"]
    (out / "config.json").write_text(json.dumps({"format": "codemae-encoder", "version": 1, "layout": 2,
                                                 "step": 1, "checkpoint": str(vit_run), "config": config}))
    encoder = codemae.load_encoder(str(out))
    x = images(3)
    with torch.no_grad():
        assert torch.equal(encoder(x, "opt"), method.encode({"opt": x})["opt"].mean(1))
    assert encoder.normalised == [] and "before codemae recorded" in encoder.meta["normalisation_note"]


def test_the_checkpoints_own_run_folder_gives_the_statistics_before_the_configs(tmp_path):
    """A checkpoint moved to another run folder takes that folder's statistics, even when the run folder its
    config names holds a newer cache of the same source."""
    import os
    import shutil

    ckpt = run(tmp_path / "run")  # its config's run_dir: tmp_path / "run"
    (original,) = (tmp_path / "run" / "stats").glob("*.json")
    moved = tmp_path / "moved"
    (moved / "checkpoints").mkdir(parents=True)
    shutil.copy(ckpt, moved / "checkpoints" / "last.pt")
    own = {m: {"mean": [0.25] * len(s.mean), "std": [0.5] * len(s.std)} for m, s in run_stats(ckpt).items()}
    (moved / "stats").mkdir()
    (moved / "stats" / original.name).write_text(json.dumps({**own, "samples": 8}))
    os.utime(original, (original.stat().st_atime, (moved / "stats" / original.name).stat().st_mtime + 60))
    meta = codemae.load_encoder(str(export_encoder(moved / "checkpoints" / "last.pt", tmp_path / "enc"))).meta
    assert meta["normalisation"] == own


def test_a_converted_encoder_takes_no_statistics_from_its_configs_run_folder(vit_run, tmp_path):
    """``write_export`` (``codemae convert``) writes weights trained elsewhere: the statistics cached in the run
    folder its config happens to name are not theirs."""
    from codemae.export import write_export

    config = torch.load(vit_run, weights_only=True)["config"]  # run_dir: vit_run's run folder, with its stats
    out = write_export(load_method(vit_run), config, tmp_path / "conv", {"checkpoint": "published.pth", "step": None})
    assert codemae.load_encoder(str(out)).meta["normalisation"] == {"opt": None, "sar": None}


def test_eval_commands_still_take_an_export_folder(vit_run, tmp_path):
    method = load_export_method(export_encoder(vit_run, tmp_path / "enc"))
    x = {"opt": images(3)}
    with torch.no_grad():
        assert torch.equal(method.encode(x)["opt"], load_method(vit_run).encode(x)["opt"])
    assert method.encoder_only


@pytest.mark.parametrize("fault", ["no config", "malformed config", "other architecture"])
def test_bad_export_folders_exit_2_in_one_line(vit_run, tmp_path, capsys, fault):
    out = export_encoder(vit_run, tmp_path / "enc")
    if fault == "no config":
        (out / "config.json").unlink()
        expected = "config.json: not a readable export config"
    elif fault == "malformed config":
        meta = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps({**meta, "version": "2", "normalisation": None}))
        expected = "config.json: not a codemae encoder export"
    else:
        other = run(tmp_path / "other", model={**VIT, "embed_dim": 64})
        weights = load_file(str(export_encoder(other, tmp_path / "other_enc") / WEIGHTS["codemae"]))
        save_file(weights, str(out / "encoder.safetensors"))
        expected = "weights do not match the export's config.json"
    capsys.readouterr()
    code = main(["embed", "--checkpoint", str(out), "--input", str(tmp_path), "--modality", "opt",
                 "--out", str(tmp_path / "emb")])
    err = capsys.readouterr().err
    assert code == 2 and expected in err and len(err.strip().splitlines()) == 1


def write_scene(path: Path, data: np.ndarray, georeferenced: bool = True, nodata: float | None = 0) -> Path:
    """A (C, H, W) uint8 GeoTIFF, UTM 33N with 10 m pixels (or no georeferencing)."""
    rasterio = pytest.importorskip("rasterio")
    from rasterio.transform import from_origin

    geo = {"crs": "EPSG:32633", "transform": from_origin(500000, 4200000, 10, 10)} if georeferenced else {}
    with rasterio.open(path, "w", driver="GTiff", height=data.shape[1], width=data.shape[2], count=data.shape[0],
                       dtype=str(data.dtype), nodata=nodata, **geo) as dst:
        dst.write(data)
    return path


def scene_data(height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(1, 256, (3, height, width), dtype=np.uint8)


def test_embed_scene_is_georeferenced_at_patch_resolution_and_keeps_nodata(vit_run, tmp_path, capsys):
    import rasterio

    data = scene_data(96, 80)
    data[:, :32, :32] = 0  # a fully nodata 2 x 2 block of patches
    data[:, 40, 50] = 0  # one nodata pixel: its patch is still computed
    scene = write_scene(tmp_path / "scene.tif", data)
    export = export_encoder(vit_run, tmp_path / "enc")
    assert main(["embed", "--checkpoint", str(export), "--input", str(scene), "--modality", "opt",
                 "--out", str(tmp_path / "emb"), "--tile", "32", "--overlap", "16", "--device", "cpu"]) == 0
    with rasterio.open(scene) as src, rasterio.open(tmp_path / "emb" / "scene_features.tif") as out:
        assert out.crs == src.crs
        assert out.transform == src.transform @ rasterio.Affine.scale(16, 16)
        assert (out.count, out.height, out.width) == (32, 6, 5)
        features = out.read()
        assert np.isnan(out.nodata)
    assert np.isnan(features[:, :2, :2]).all()
    assert np.isfinite(features).sum() == 32 * (30 - 4)
    assert "4 nodata patches" in capsys.readouterr().out


def test_embed_scene_stitching_matches_the_whole_scene_and_a_single_window(vit_run, tmp_path):
    """Strips of one window row stitch to the one-strip result, and a scene of one tile is the encoder's
    feature map of the whole image."""
    import rasterio

    from codemae.eval.embed import embed_scene

    encoder = codemae.load_encoder(str(export_encoder(vit_run, tmp_path / "enc")))
    scene = write_scene(tmp_path / "s.tif", scene_data(80, 64), nodata=None)
    maps = []
    for name, values in (("whole", 1 << 30), ("strips", 1)):
        embed_scene(encoder, scene, "opt", tmp_path / f"{name}.tif", 32, 16, progress=False, strip_values=values)
        with rasterio.open(tmp_path / f"{name}.tif") as out:
            maps.append(out.read())
    assert np.allclose(maps[0], maps[1], atol=1e-5)
    one = scene_data(32, 32, seed=3)
    embed_scene(encoder, write_scene(tmp_path / "one.tif", one, nodata=None), "opt", tmp_path / "one_f.tif", 32, 0,
                progress=False)
    with rasterio.open(tmp_path / "one_f.tif") as out, torch.no_grad():
        x = torch.from_numpy(one.astype(np.float32) / 255.0)[None]
        assert np.allclose(out.read(), encoder.feature_map(x, "opt")[0].numpy(), atol=1e-5)


def test_embed_scene_of_partial_patches_keeps_its_windows_on_the_patch_grid(vit_run, tmp_path):
    """A scene whose size is not a multiple of the patch size gives the feature map of its whole patches
    (the last windows start on the patch grid, not flush with the scene's edge), with a note."""
    import rasterio

    from codemae.eval.embed import embed_scene

    encoder = codemae.load_encoder(str(export_encoder(vit_run, tmp_path / "enc")))
    data = scene_data(90, 70)
    maps, notes = [], []
    for name, values in (("partial", data), ("whole", np.ascontiguousarray(data[:, :80, :64]))):
        notes.append(embed_scene(encoder, write_scene(tmp_path / f"{name}.tif", values, nodata=None), "opt",
                                 tmp_path / f"{name}_f.tif", 32, 16, progress=False)["notes"])
        with rasterio.open(tmp_path / f"{name}_f.tif") as out:
            maps.append(out.read())
    assert notes == [["the last 10 rows and 6 columns (part of a patch) are left out"], []]
    assert maps[0].shape == (32, 5, 4) and np.allclose(maps[0], maps[1], atol=1e-5)


def test_embed_scene_without_georeferencing_works_with_a_note(vit_run, tmp_path, capsys):
    scene = write_scene(tmp_path / "plain.tif", scene_data(32, 48), georeferenced=False, nodata=None)
    assert main(["embed", "--checkpoint", str(vit_run), "--input", str(scene), "--modality", "opt",
                 "--out", str(tmp_path / "emb")]) == 0
    assert "note: no georeferencing" in capsys.readouterr().out


def test_embed_scene_smaller_than_a_tile_is_padded_and_than_a_patch_refused(vit_run, tmp_path, capsys):
    small = write_scene(tmp_path / "small.tif", scene_data(24, 40), nodata=None)
    assert main(["embed", "--checkpoint", str(vit_run), "--input", str(small), "--modality", "opt",
                 "--out", str(tmp_path / "emb"), "--tile", "32", "--overlap", "0"]) == 0
    assert "smaller than one tile (32): padded" in capsys.readouterr().out
    tiny = write_scene(tmp_path / "tiny.tif", scene_data(8, 8), nodata=None)
    assert main(["embed", "--checkpoint", str(vit_run), "--input", str(tiny), "--modality", "opt",
                 "--out", str(tmp_path / "emb")]) == 2
    err = capsys.readouterr().err
    assert "smaller than one patch (16 px)" in err and len(err.strip().splitlines()) == 1
    assert main(["embed", "--checkpoint", str(vit_run), "--input", str(small), "--modality", "opt",
                 "--out", str(tmp_path / "emb"), "--tile", "32", "--overlap", "8"]) == 2
    assert "multiple of the patch size 16" in capsys.readouterr().err


def test_embed_folder_writes_one_embedding_per_image_and_an_index(vit_run, tmp_path, capsys):
    from PIL import Image

    root = tmp_path / "images"
    root.mkdir()
    arrays = [np.random.default_rng(i).integers(0, 256, (32, 32, 3), dtype=np.uint8) for i in range(3)]
    for i, a in enumerate(arrays):
        Image.fromarray(a).save(root / f"img{i}.png")
    export = export_encoder(vit_run, tmp_path / "enc")
    assert main(["embed", "--checkpoint", str(export), "--input", str(root), "--modality", "opt",
                 "--out", str(tmp_path / "emb"), "--batch-size", "2", "--device", "cpu"]) == 0
    assert "embeddings.npy" in capsys.readouterr().out  # pyarrow is not installed here
    got = np.load(tmp_path / "emb" / "embeddings.npy")
    encoder = codemae.load_encoder(str(export))
    with torch.no_grad():
        x = torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0).permute(0, 3, 1, 2)
        assert np.allclose(got, encoder(x, "opt").numpy(), atol=1e-5)
    index = (tmp_path / "emb" / "index.csv").read_text().splitlines()
    assert index[0] == "row,name,opt" and [r.split(",")[1] for r in index[1:]] == ["img0", "img1", "img2"]


def test_without_rasterio_scenes_are_decoded_by_tifffile_and_written_without_georeferencing(vit_run, tmp_path,
                                                                                             monkeypatch, capsys):
    import tifffile

    from codemae.data import rasters
    from codemae.eval import embed

    data = scene_data(48, 32).transpose(1, 2, 0)
    data[:16, :16] = 0
    tifffile.imwrite(tmp_path / "s.tif", data, photometric="rgb", compression="lzw",
                     extratags=[(42113, "s", 0, "0", True)])  # GDAL_NODATA 0
    monkeypatch.setattr(rasters, "rasterio", None)
    monkeypatch.setattr(embed, "rasterio", None)
    assert main(["embed", "--checkpoint", str(vit_run), "--input", str(tmp_path / "s.tif"), "--modality", "opt",
                 "--out", str(tmp_path / "emb"), "--tile", "32", "--overlap", "16"]) == 0
    assert "needs the geo extra" in capsys.readouterr().out
    features = tifffile.imread(tmp_path / "emb" / "s_features.tif")
    assert features.shape == (32, 3, 2) and np.isnan(features[:, 0, 0]).all()
    assert np.isfinite(features).sum() == 32 * 5


def test_pooled_statistics_of_several_sources_are_those_of_their_equal_mixture():
    from codemae.data.stats import pooled_stats
    from codemae.data.transforms import Normalisation

    pooled = pooled_stats([Normalisation([0.2], [0.1]), Normalisation([0.4], [0.1])])
    assert pooled.mean == [0.3] and pooled.std == [round(0.02 ** 0.5, 6)]  # var = (0.05 + 0.17) / 2 - 0.09
    same = Normalisation([0.1, 0.2], [0.3, 0.4])
    assert pooled_stats([same, same]) == same


def test_band_names_follow_the_sources_picks():
    from codemae.config import Config, from_dict
    from codemae.export import band_names

    s2 = ["B1", "B2", "B3", "B4", "B5", "B6", "B7", "B8", "B8A", "B9", "B11", "B12"]
    cfg = from_dict(Config, {"data": {"sources": [
        {"kind": "opt", "root": "x", "opt_bands": ["B4", "2", "B2"], "opt_band_names": s2},
        {"kind": "sar", "root": "y"}]}})
    assert band_names(cfg, "opt", 3) == ["B4", "B3", "B2"]
    assert band_names(cfg, "sar", 2) == ["VV", "VH"] and band_names(cfg, "sar", 1) is None


def test_embed_folder_of_pairs_concatenates_optical_then_sar(vit_run, tmp_path):
    from conftest import write_pairs

    from codemae.data.sources import FolderSource
    from codemae.config import SourceConfig

    root = write_pairs(tmp_path / "pairs", n=3, size=32)
    export = export_encoder(vit_run, tmp_path / "enc")
    assert main(["embed", "--checkpoint", str(export), "--input", str(root), "--modality", "both",
                 "--out", str(tmp_path / "emb"), "--device", "cpu"]) == 0
    got = np.load(tmp_path / "emb" / "embeddings.npy")
    encoder = codemae.load_encoder(str(export))
    source = FolderSource(SourceConfig(kind="paired", root=str(root), holdout=[]), encoder.encoder.channels)
    with torch.no_grad():
        x = {m: torch.stack([torch.from_numpy(source.load(i)[m]).permute(2, 0, 1) for i in range(3)])
             for m in ("opt", "sar")}
        expected = torch.cat([encoder(x["opt"], "opt"), encoder(x["sar"], "sar")], dim=1)
    assert got.shape == (3, 64) and np.allclose(got, expected.numpy(), atol=1e-5)
