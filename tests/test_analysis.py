"""Analysis measures and the HTML report, opened in headless Chromium."""

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchmetrics.functional.image import structural_similarity_index_measure

from codemae.analysis.collect import RECONSTRUCTED, reconstructed, spread
from codemae.analysis.measures import (bin_by, effective_rank, patch_ssim, project_2d, reconstruction_errors,
                                       singular_spectrum, smooth_field_errors)
from codemae.analysis.report import SECTIONS
from codemae.cli import main
from codemae.methods import build_method
from codemae.train.engine import pretrain

from conftest import tiny_config


def test_effective_rank_identity_and_rank_one():
    assert effective_rank(torch.eye(7)) == pytest.approx(7.0)
    torch.manual_seed(0)
    u, v = torch.randn(20, 1, dtype=torch.float64), torch.randn(1, 12, dtype=torch.float64)
    assert effective_rank(u @ v) == pytest.approx(1.0, abs=1e-6)
    spectrum = singular_spectrum(torch.randn(50, 8))
    assert spectrum[0] == 1.0 and (spectrum[1:] <= spectrum[:-1]).all()


def test_patch_ssim_matches_torchmetrics_per_patch():
    torch.manual_seed(0)
    a, b = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    ours = patch_ssim(a, b, 16)
    assert ours.shape == (2, 4)
    for i in range(2):
        for k in range(4):
            r, c = divmod(k, 2)
            pa = a[i : i + 1, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            pb = b[i : i + 1, :, r * 16 : (r + 1) * 16, c * 16 : (c + 1) * 16]
            ref = structural_similarity_index_measure(pa, pb, data_range=1.0)
            assert ours[i, k].item() == pytest.approx(ref.item(), abs=1e-5)
    assert patch_ssim(a, a, 16).min().item() == pytest.approx(1.0, abs=1e-5)


def test_binning_on_hand_made_data():
    x = torch.arange(10.0)
    binned = bin_by(x, 2 * x + 1, bins=5)
    assert binned.counts == [2] * 5
    assert binned.centres == [0.5, 2.5, 4.5, 6.5, 8.5]
    assert binned.means == [2.0, 6.0, 10.0, 14.0, 18.0]
    assert binned.slope == pytest.approx(2.0) and binned.intercept == pytest.approx(1.0)


def test_reconstruction_errors_against_the_flattened_reconstruction_by_hand():
    target = torch.tensor([[0.0, 2.0, 5.0, 5.0], [1.0, 3.0, 0.0, 4.0]]).reshape(1, 1, 2, 4)  # two 2x2 patches
    mask = torch.tensor([[1, 0]])  # the left patch (0, 2, 1, 3; mean 1.5) is masked, the right one visible
    means = torch.tensor([[1.5, 1.5, 7.0, 7.0], [1.5, 1.5, 7.0, 7.0]]).reshape(1, 1, 2, 4)  # already flat
    assert reconstruction_errors(means, target, mask, 2) == (5.0, 5.0)  # (0-1.5)^2+(2-1.5)^2+(1-1.5)^2+(3-1.5)^2
    assert reconstruction_errors(target, target, mask, 2) == (0.0, 5.0)
    shifted = target + torch.tensor([[0.0, 0.0, 9.0, 9.0]] * 2).reshape(1, 1, 2, 4)  # error only where visible
    assert reconstruction_errors(shifted, target, mask, 2) == (0.0, 5.0)
    right_shape_wrong_level = target + torch.tensor([[10.0, 10.0, 0.0, 0.0]] * 2).reshape(1, 1, 2, 4)
    assert reconstruction_errors(right_shape_wrong_level, target, mask, 2) == (400.0, 405.0)  # 4 x 10^2; 5 + 400


def test_report_gives_each_modalitys_reconstruction_error_ratio(report):
    rows = json.loads((report / "report.json").read_text())["checkpoints"]
    for modality in ("optical", "SAR", "SAR, chips/picked"):
        ratio = rows[0][f"recon error / flattened-recon error ({modality})"]
        assert 0.5 < ratio < 5.0  # norm-pix, 2 steps: predictions near each patch's mean, mapped back
        assert 0.0 < rows[0][f"smooth-field reference ({modality})"] < 2.0  # above 1 on noise chips
    assert "Reconstructions also of 3 unpaired images of chips/picked" in (report / "index.html").read_text()


@pytest.mark.parametrize("extra, message", [
    (["--images-list", "picked.txt"], "--images-list names images of --images"),
    (["--images", "chips", "--images-list", "wrong.txt"], "wrong.txt: 'tank/9' is not in --images chips"),
])
def test_unpaired_images_bad_input_is_one_line_exit_2(report, extra, message, capsys, monkeypatch):
    monkeypatch.chdir(report.parent)
    code = main(["analyze", "--checkpoint", str(report.parent / "run" / "checkpoints" / "last.pt"), "--pairs",
                 "synthetic", "--pairs-n", "4", "--out", "again", *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1


def test_a_method_without_pixel_decoder_has_no_reconstruction_or_ratio(tmp_path):
    vit = {"backbone": "vit_tiny", "embed_dim": 32, "num_heads": 2, "depth": 2}
    inputs = {"opt": torch.randn(6, 3, 32, 32), "sar": torch.randn(6, 1, 32, 32)}  # two batches of 4
    fusmae = build_method(tiny_config(tmp_path, model=vit, method={"name": "fusmae"})).eval()
    nothing = reconstructed(fusmae, inputs, 4)
    assert (nothing.shown, nothing.error_ratio, nothing.reference_ratio, nothing.count) == ({}, {}, {}, 6)
    mae = reconstructed(build_method(tiny_config(tmp_path)).eval(), inputs, 4)
    assert set(mae.error_ratio) == set(mae.reference_ratio) == {"opt", "sar"}
    assert mae.shown["sar_recon"].shape == mae.inputs["sar"].shape == (RECONSTRUCTED, 1, 32, 32)
    sar_only = reconstructed(build_method(tiny_config(tmp_path)).eval(), {"sar": inputs["sar"]}, 4)
    assert set(sar_only.error_ratio) == {"sar"} and "opt_recon" not in sar_only.shown


def test_smooth_field_reference_by_hand():
    ramp = torch.arange(4.0).repeat(2, 1).reshape(1, 1, 2, 4).repeat(1, 2, 1, 1)  # two 2x2 patches, 2 channels
    # patch means 0.5 and 2.5; bilinear between the centres, re-centred: 0.25, 0.75 | 2.25, 2.75 in each row
    assert smooth_field_errors(ramp, 2) == (2 * 8 * 0.25**2, 2 * 8 * 0.5**2)
    assert smooth_field_errors(ramp.transpose(2, 3), 2) == (2 * 8 * 0.25**2, 2 * 8 * 0.5**2)  # patches stacked
    # the field runs through the channel mean: channels ramp + 1 and ramp - 1 add 1 per pixel and channel to both
    apart = torch.cat([ramp[:, :1] + 1, ramp[:, :1] - 1], 1)
    assert smooth_field_errors(apart, 2) == (2 * 8 * 0.25**2 + 16, 2 * 8 * 0.5**2 + 16)
    steps = torch.tensor([[0.0, 0.0, 2.0, 2.0]] * 2).reshape(1, 1, 2, 4)  # flat patches: the field adds a slope
    smooth, flat = smooth_field_errors(steps, 2)
    assert flat == 0.0 and smooth == pytest.approx(8 * 0.25**2)


def test_unpaired_images_are_spread_over_a_sorted_list():
    assert spread(10, 4).tolist() == [0, 3, 6, 9] and spread(3, 200).tolist() == [0, 1, 2]


def test_projection_falls_back_to_pca_without_umap():
    points = np.random.default_rng(0).normal(size=(30, 6))
    coords, how = project_2d(points)
    assert coords.shape == (30, 2) and how.split(" ")[0] in ("UMAP", "PCA")


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("analysis")
    cfg = tiny_config(tmp / "run", method={"name": "codemae", "cdr": True, "ccl": "cross_attention"},
                      train={"max_steps": 2})
    pretrain(cfg)
    rng = np.random.default_rng(0)
    for k in range(5):  # unpaired SAR chips of two sizes, three of them picked by a split list
        (tmp / "chips" / "tank").mkdir(parents=True, exist_ok=True)
        size = (40, 40) if k % 2 else (48, 36)
        Image.fromarray(rng.integers(0, 255, size, dtype=np.uint8)).save(tmp / "chips" / "tank" / f"{k}.png")
    (tmp / "picked.txt").write_text("tank/0\ntank/1\ntank/4\n")
    (tmp / "wrong.txt").write_text("tank/9\n")
    out = tmp / "report"
    assert main(["analyze", "--checkpoint", str(tmp / "run" / "checkpoints" / "last.pt"), "--pairs", "synthetic",
                 "--pairs-n", "24", "--images", str(tmp / "chips"), "--images-list", str(tmp / "picked.txt"),
                 "--out", str(out)]) == 0
    return out


def test_report_has_every_section_and_real_pictures(report):
    page = (report / "index.html").read_text()
    for section in SECTIONS:
        assert f"<h2>{section}</h2>" in page
    images = re.findall(r'<img src="([^"]+)"', page)
    assert {"spectrum.png", "alignment.png", "embeddings_0.png", "reconstructions_0.png",
            "reconstructions_0_images.png"} <= set(images)
    for name in images:
        pixels = np.asarray(Image.open(report / name).convert("L"), dtype=np.float32)
        assert pixels.std() > 5, f"{name} looks blank"
    assert "CDR: optical target from SAR" not in page  # figure text is in the PNG, not the page
    for href in re.findall(r'href="([^"#][^"]*)"', page):
        assert (report / href).is_file(), href


CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_report_opens_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed (make test installs Debian's chromium where it can)")
    url = (report / "index.html").resolve().as_uri()
    common = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120).stdout
    assert 'data-checked="yes"' in dom, "the page's load check did not run"
    total = int(re.search(r'data-images-total="(\d+)"', dom).group(1))
    assert total >= 4 and 'data-images-broken=""' in dom
    anchors = set(re.findall(r'id="([^"]+)"', dom))
    assert set(re.findall(r'href="#([^"]+)"', dom)) <= anchors  # every in-page link has its target
    shot = tmp_path / "shot.png"
    subprocess.run([*common, "--window-size=1000,2400", f"--screenshot={shot}", url], capture_output=True,
                   timeout=120)
    pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
    assert pixels.std() > 5
