"""CoDe-MAE mechanisms: OKD, CCL, CDR, the gathered InfoNCE and the teacher loaders."""

import math

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from codemae.config import TeacherConfig
from codemae.data.teacher_cache import roi_align
from codemae.data.transforms import CropBox
from codemae.errors import ConfigError
from codemae.losses import symmetric_info_nce
from codemae.methods import build_method
from codemae.methods.cdr_targets import CDR_TARGETS, as_rgb, gaussian_window, grayscale, hog_maps, mgf_maps
from codemae.batch import make_batch
from codemae.loading import build_teacher
from codemae.models.teacher import Teacher

from conftest import tiny_config

ALL_ON = {"name": "codemae", "okd": True, "ccl": "cross_attention", "cdr": True, "teacher": {"dim": 8}}


class PatchLocalTeacher(Teacher):
    """A frozen conv with kernel = stride = 16: each patch token sees only its own pixels."""

    def __init__(self) -> None:
        super().__init__(TeacherConfig(dim=8))
        self.dim, self.patch_size = 8, 16
        self.conv = nn.Conv2d(3, 8, 16, 16)

    def patch_tokens(self, x):
        return self.conv(x).flatten(2).transpose(1, 2)


def make(tmp_path, **method):
    torch.manual_seed(0)
    model = build_method(tiny_config(tmp_path, method={**ALL_ON, **method}))
    model.attach_teacher(PatchLocalTeacher().freeze())
    return model


def batch(paired=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    return make_batch(torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, 1, 32, 32, generator=g), paired,
                      opt_mean=torch.full((4, 3), 0.4), opt_std=torch.full((4, 3), 0.2))


def run(model, b, seed=1):
    torch.manual_seed(seed)  # same masks on every call
    return model(b)


def visible_and_masked_patch(model, b, seed=1):
    torch.manual_seed(seed)
    mask = model.embed_visible({"opt": b["opt"]})["opt"].mask.mask[0]
    return int((mask == 0).nonzero()[0]), int((mask == 1).nonzero()[0])


def patch_slice(patch):
    r, c = divmod(patch, 2)
    return (0, slice(None), slice(r * 16, (r + 1) * 16), slice(c * 16, (c + 1) * 16))


def test_info_nce_hand_computed_3x3():
    a = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = torch.tensor([[1.0, 0.2], [0.1, 1.0], [-1.0, 1.0]])
    an = [[x / math.hypot(*r) for x in r] for r in a.tolist()]
    bn = [[x / math.hypot(*r) for x in r] for r in b.tolist()]
    t = 0.07
    logits = [[sum(p * q for p, q in zip(u, v)) / t for v in bn] for u in an]

    def ce(rows):
        return sum(math.log(sum(math.exp(x) for x in row)) - row[i] for i, row in enumerate(rows)) / len(rows)

    expected = (ce(logits) + ce([list(col) for col in zip(*logits)])) / 2
    assert symmetric_info_nce(a, b, t).item() == pytest.approx(expected, rel=1e-5)


def _gather_worker(rank: int, world: int, store: str, out: str, gradient: str = "exact") -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    torch.manual_seed(0)
    net_a, net_b = nn.Linear(5, 4), nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    part = slice(rank * 4, (rank + 1) * 4)
    loss = symmetric_info_nce(net_a(x[part]), net_b(y[part]), 0.07, gradient)
    loss.backward()
    grads = [p.grad.clone() for p in [*net_a.parameters(), *net_b.parameters()]]
    for g in grads:  # what DDP does: average gradients over processes
        dist.all_reduce(g)
        g /= world
    torch.save({"loss": loss.detach(), "grads": grads}, f"{out}.{rank}")
    dist.destroy_process_group()


def test_gathered_info_nce_two_processes_equal_one_process(tmp_path):
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2)
    torch.manual_seed(0)
    net_a, net_b = nn.Linear(5, 4), nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    loss = symmetric_info_nce(net_a(x), net_b(y), 0.07)
    loss.backward()
    single = [p.grad for p in [*net_a.parameters(), *net_b.parameters()]]
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        torch.testing.assert_close(got["loss"], loss.detach(), rtol=1e-5, atol=1e-6)
        for g1, g2 in zip(got["grads"], single):
            torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_local_ccl_gradient_is_the_published_query_side_gradient(tmp_path):
    """``ccl_gradient: local``: each process's loss scores its own rows against all rows detached
    (the published code); DDP's average of those gradients is checked against a hand-written
    emulation of the two processes, and is smaller than the exact full-batch gradient."""
    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out"), "local"), nprocs=2)
    torch.manual_seed(0)
    net_a, net_b = nn.Linear(5, 4), nn.Linear(5, 4)
    x, y = torch.randn(8, 5), torch.randn(8, 5)
    params = [*net_a.parameters(), *net_b.parameters()]
    a, b = F.normalize(net_a(x), dim=-1), F.normalize(net_b(y), dim=-1)
    per_rank = []
    for rank in range(2):
        rows = slice(rank * 4, (rank + 1) * 4)
        labels = torch.arange(4) + rank * 4
        loss = (F.cross_entropy(a[rows] @ b.detach().T / 0.07, labels)
                + F.cross_entropy(b[rows] @ a.detach().T / 0.07, labels)) / 2
        per_rank.append(torch.autograd.grad(loss, params, retain_graph=True))
    expected = [(g0 + g1) / 2 for g0, g1 in zip(*per_rank)]
    exact = torch.autograd.grad(symmetric_info_nce(net_a(x), net_b(y), 0.07), params)
    for rank in range(2):
        got = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        for g, e in zip(got["grads"], expected):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
    norm = lambda gs: torch.sqrt(sum((g**2).sum() for g in gs))  # noqa: E731
    assert norm(expected) < norm(exact)
    one = symmetric_info_nce(net_a(x), net_b(y), 0.07, "local")  # one process: the same as exact
    torch.testing.assert_close(one, symmetric_info_nce(net_a(x), net_b(y), 0.07), rtol=1e-6, atol=0)


def test_okd_ignores_sar_and_masked_optical_pixels(tmp_path):
    model = make(tmp_path).eval()
    b = batch()
    base = run(model, b)["okd"]
    sar_changed = {**b, "sar": b["sar"] + torch.randn_like(b["sar"])}
    assert torch.equal(run(model, sar_changed)["okd"], base)
    seen, hidden = visible_and_masked_patch(model, b)
    masked = {**b, "opt": b["opt"].clone()}
    masked["opt"][patch_slice(hidden)] += 1.0
    assert torch.equal(run(model, masked)["okd"], base)
    visible = {**b, "opt": b["opt"].clone()}
    visible["opt"][patch_slice(seen)] += 1.0
    assert not torch.equal(run(model, visible)["okd"], base)


def test_cdr_ignores_visible_target_pixels(tmp_path):
    model = make(tmp_path).eval()
    b = batch()
    base = run(model, b)["cdr"]
    seen, hidden = visible_and_masked_patch(model, b)
    changed = {**b, "opt": b["opt"].clone()}
    changed["opt"][patch_slice(seen)] += torch.randn(3, 16, 16)
    assert torch.equal(run(model, changed)["cdr"], base)
    changed["opt"][patch_slice(hidden)] += torch.randn(3, 16, 16)
    assert not torch.equal(run(model, changed)["cdr"], base)


def test_unpaired_batches_zero_ccl_cdr_but_every_parameter_gets_a_gradient(tmp_path):
    for direction in ("sar_to_opt", "both"):
        model = make(tmp_path, cdr_direction=direction)
        terms = run(model, batch(paired=False))
        assert set(terms) == {"recon", "okd", "ccl", "cdr"}
        assert terms["ccl"].item() == 0.0 and terms["cdr"].item() == 0.0
        sum(terms.values()).backward()
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        assert not missing, missing
        assert not any(n.startswith("_teacher") for n in model.state_dict())  # teacher is not saved
    paired = run(make(tmp_path), batch(paired=True))
    assert paired["ccl"].item() > 0 and paired["cdr"].item() > 0


def test_ccl_conditioned_embedding_is_base_plus_cross_attention_residual(tmp_path):
    """opt' = opt + CA(LN(opt), LN(sar)): no MLP, no output norm. With the CA output
    projection zeroed, CCL sees the raw tokens and equals the vanilla contrastive loss."""
    model = make(tmp_path)
    head = model.ccl_heads.opt
    x, y = torch.randn(2, 5, 32), torch.randn(2, 3, 32)
    torch.testing.assert_close(head(x, y) - x, head.attn(head.norm_q(x), head.norm_kv(y)))
    assert [type(m).__name__ for m in head.children()] == ["LayerNorm", "LayerNorm", "CrossAttention"]
    vanilla = make(tmp_path, ccl="vanilla")
    for ca in (model.ccl_heads.opt, model.ccl_heads.sar):
        nn.init.zeros_(ca.attn.proj.weight)
        nn.init.zeros_(ca.attn.proj.bias)
    vanilla.load_state_dict(model.state_dict(), strict=False)
    b = batch()
    torch.testing.assert_close(run(model, b)["ccl"], run(vanilla, b)["ccl"])


@pytest.mark.parametrize("space", ["vanilla", "linear", "mlp", "cross_attention"])
def test_contrastive_spaces_build_and_train(tmp_path, space):
    model = make(tmp_path, ccl=space, okd=False, cdr=False)
    terms = run(model, batch())
    assert set(terms) == {"recon", "ccl"}
    sum(terms.values()).backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("target", list(CDR_TARGETS))
@pytest.mark.parametrize("direction", ["sar_to_opt", "both"])
def test_cdr_targets(tmp_path, target, direction):
    """Every target trains in both directions through one head of the target's width; the SAR side is
    the same target of the SAR image (its channels averaged, repeated to three)."""
    model = make(tmp_path, cdr_target=target, cdr_direction=direction, okd=False, ccl="none")
    b = batch() | {"sar_mean": torch.full((4, 1), 0.3), "sar_std": torch.full((4, 1), 0.1)}
    b["opt"], b["sar"] = b["opt"].clamp(-2, 2), b["sar"].clamp(-2, 2)  # [0, 1] images stay positive for MGF's logs
    terms = run(model, b)
    assert torch.isfinite(terms["cdr"]) and terms["cdr"] > 0
    spec = CDR_TARGETS[target]
    assert list(model.cdr_decoder.heads) == [str(spec.length(16))]
    assert set(model.cdr_decoder.outputs) == ({"sar", "opt"} if direction == "both" else {"sar"})
    vectors = spec.compute(torch.rand(2, 3, 32, 32), 16)
    assert vectors.shape == (2, 4, spec.length(16))
    sar = torch.rand(2, 1, 32, 32)
    torch.testing.assert_close(spec.compute(as_rgb(sar), 16), spec.compute(sar.expand(-1, 3, -1, -1), 16))


def test_grayscale_and_hog_by_hand():
    rgb = torch.zeros(1, 3, 2, 2)
    rgb[0, 0] = 1.0
    assert torch.allclose(grayscale(rgb), torch.full((1, 1, 2, 2), 0.299))
    ramp = torch.arange(32.0).repeat(32, 1)[None, None] / 32  # brightness increases along x only
    maps = hog_maps(ramp, 16)
    assert maps.shape == (1, 9, 32, 32)
    # Sobel gx = left - right < 0, gy = 0: atan2(gx, gy) = -pi/2 -> floor(-4.5) = -5 -> bin 4 (mod 9)
    assert (maps[0, :, 8:24, 8:24].argmax(0) == 4).all()
    assert maps[0, [b for b in range(9) if b != 4]].abs().max() == 0
    # inner cells: magnitude 8/32 (Sobel's 1-2-1 weights on a slope of 1/32) times the window, summed per cell
    window = gaussian_window(16, 8, ramp.device)
    cells = hog_maps(ramp, 16)  # bilinear maps average neighbouring cells; the cell at [1, 1] of patch 0:
    assert window.sum().item() == pytest.approx(1.0)
    assert cells[0, 4].max().item() <= 8 / 32 * window[8:, 8:].sum().item() + 1e-6


def test_mgf_by_hand():
    """A vertical step from a to b: at the first b column the radius-9 left half holds 9 columns of a and
    the centre column, the right half 10 columns of b, so gx = log((9(a+0.01) + (b+0.01)) / (10 (b+0.01)))."""
    a, b = 0.2, 0.6
    image = torch.full((1, 1, 48, 48), a)
    image[..., 24:] = b
    maps = mgf_maps(image)
    assert maps.shape == (1, 3, 48, 48)
    expected = abs(math.log((9 * (a + 0.01) + (b + 0.01)) / (10 * (b + 0.01))))
    assert maps[0, 0, 24, 24].item() == pytest.approx(expected, rel=1e-5)
    assert maps[0, 0, 24, 2].item() == pytest.approx(0.0, abs=1e-6)  # a flat neighbourhood: log 1 = 0
    assert torch.isfinite(mgf_maps(torch.zeros(1, 1, 48, 48))).all()  # the offset keeps black images finite


def test_okd_without_teacher_or_cache_is_a_config_error(tmp_path):
    model = make(tmp_path)
    model.attach_teacher(None)
    with pytest.raises(ConfigError, match="no teacher"):
        run(model, batch())


def test_roi_align_on_hand_made_features():
    """Features equal to the x coordinate (in image pixels) of each cell centre are read
    back at the crop's cell centres (interior cells; at the border bilinear sampling clamps)."""
    feats = (torch.arange(8.0) * 4 + 2).repeat(8, 1)[None]  # 8x8 grid over a 32x32 image
    full = roi_align(feats, CropBox(0, 0, 32, 32, False, (32, 32)), grid=8)[:, 0].view(8, 8)
    torch.testing.assert_close(full[:, 1:7], feats[0][:, 1:7])
    inner = roi_align(feats, CropBox(4, 12, 16, 16, False, (32, 32)), grid=4)[:, 0].view(4, 4)
    torch.testing.assert_close(inner, torch.tensor([14.0, 18.0, 22.0, 26.0]).repeat(4, 1))
    flipped = roi_align(feats, CropBox(4, 12, 16, 16, True, (32, 32)), grid=4)[:, 0].view(4, 4)
    torch.testing.assert_close(flipped, torch.tensor([26.0, 22.0, 18.0, 14.0]).repeat(4, 1))


def test_hf_loader_on_a_small_random_dinov3(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.DINOv3ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                          intermediate_size=64, patch_size=16, image_size=64, num_register_tokens=4)
    transformers.DINOv3ViTModel(config).save_pretrained(tmp_path / "dinov3")
    teacher = build_teacher(TeacherConfig(kind="hf", path=str(tmp_path / "dinov3"), dim=32))
    grid = teacher(torch.rand(2, 3, 64, 64))
    assert grid.shape == (2, 32, 4, 4)
    assert not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ConfigError, match="method.teacher.dim"):
        build_teacher(TeacherConfig(kind="hf", path=str(tmp_path / "dinov3"), dim=1024))


HUBCONF = '''
import torch
from torch import nn


class TinyDinoV3(nn.Module):
    """DINOv3's token layout: [cls, 4 registers, patches]; forward_features returns the normed patches."""

    def __init__(self):
        super().__init__()
        self.embed_dim, self.patch_size, self.n_storage_tokens = 24, 16, 4
        self.patch_embed = nn.Conv2d(3, 24, 16, 16)
        self.tokens = nn.Parameter(torch.zeros(1, 5, 24))
        self.norm = nn.LayerNorm(24)

    def forward_features(self, x):
        patches = self.patch_embed(x).flatten(2).transpose(1, 2)
        x = self.norm(torch.cat([self.tokens.expand(x.shape[0], -1, -1), patches], 1))
        return {"x_norm_clstoken": x[:, 0], "x_storage_tokens": x[:, 1:5], "x_norm_patchtokens": x[:, 5:]}


def dinov3_vitl16(pretrained=True, weights=None, **kwargs):
    model = TinyDinoV3()
    if pretrained:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    return model
'''


def test_hub_loader_on_a_local_repository_and_weights(tmp_path):
    repo = tmp_path / "dinov3"
    repo.mkdir()
    (repo / "hubconf.py").write_text(HUBCONF)
    namespace: dict = {}
    exec(HUBCONF, namespace)  # the test builds and saves the weights itself
    torch.save(namespace["TinyDinoV3"]().state_dict(), tmp_path / "w.pth")
    teacher = build_teacher(TeacherConfig(kind="hub", path=str(repo), weights=str(tmp_path / "w.pth"), dim=24))
    assert teacher(torch.rand(1, 3, 48, 48)).shape == (1, 24, 3, 3)
    with pytest.raises(Exception, match="never downloaded"):
        build_teacher(TeacherConfig(kind="hub", path=str(repo), weights="", dim=24))


def test_checkpoint_teacher_and_loss_terms_logged(tmp_path):
    """OKD from a codemae checkpoint's encoder: a short CoDe-MAE run logs every term."""
    import csv

    from codemae.train.engine import pretrain

    pretrain(tiny_config(tmp_path / "teacher_run", train={"max_steps": 1}))
    teacher = {"kind": "checkpoint", "path": str(tmp_path / "teacher_run" / "checkpoints" / "last.pt"), "dim": 32}
    cfg = tiny_config(tmp_path / "run", method={**ALL_ON, "teacher": teacher}, train={"max_steps": 3})
    pretrain(cfg)
    rows = list(csv.DictReader((tmp_path / "run" / "metrics.csv").open()))
    assert len(rows) == 3 and {"recon", "okd", "ccl", "cdr", "total"} <= set(rows[0])
    assert all(float(r[k]) > 0 for r in rows for k in ("okd", "ccl", "cdr"))


def test_teacher_cache_cli_then_pretraining_reads_it(tmp_path):
    import numpy as np
    import yaml

    from codemae.cli import main
    from codemae.config import to_dict
    from codemae.data.pipeline import build_dataset
    from codemae.errors import DataError
    from codemae.loading import cached_teacher_features
    from codemae.train.engine import pretrain

    from conftest import write_pairs

    pretrain(tiny_config(tmp_path / "teacher_run", train={"max_steps": 1}))
    pairs = write_pairs(tmp_path / "pairs", n=8)
    teacher = {"kind": "checkpoint", "path": str(tmp_path / "teacher_run" / "checkpoints" / "last.pt"),
               "dim": 32, "cache": str(tmp_path / "cache")}
    cfg = tiny_config(tmp_path / "run", method={**ALL_ON, "teacher": teacher}, train={"max_steps": 2},
                      data={"sources": [{"name": "pairs", "kind": "paired", "root": str(pairs)}]})
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert main(["teacher-cache", "--config", str(config)]) == 0
    cached = np.load(tmp_path / "cache" / "pairs.npy")
    assert cached.shape == (8, 2, 2, 32) and cached.dtype == np.float16
    # pretraining with the cache never builds the teacher: point it at nothing
    assert main(["pretrain", "--config", str(config), "method.teacher.kind=none"]) == 0
    features = cached_teacher_features(cfg.method.teacher.cache)
    item = build_dataset(cfg.data, cfg.model.geometry, tmp_path / "run", teacher_features=features)[(0, 5)]
    assert item["teacher_opt"].shape == (4, 32)
    (pairs / "opt" / "t7.png").unlink()
    (pairs / "sar" / "t7.png").unlink()
    with pytest.raises(DataError, match="other samples"):
        build_dataset(cfg.data, cfg.model.geometry, tmp_path / "run", teacher_features=features)


@pytest.mark.parametrize("head", ["linear", "mlp"])
def test_rigid_alignment_baseline_uses_raw_encoder_embeddings(tmp_path, head):
    model = make(tmp_path, okd=False, cdr=False, ccl=head, ccl_input="encoder")
    first = model.ccl_heads.opt if head == "linear" else model.ccl_heads.opt.fc1
    assert first.in_features == model.encoder.embed_dim
    b = batch()
    torch.manual_seed(1)
    vis = model.embed_visible(model.images(b))
    expected = symmetric_info_nce(model.ccl_heads.opt(vis["opt"].features.mean(1)),
                                  model.ccl_heads.sar(vis["sar"].features.mean(1)), 0.07)
    torch.testing.assert_close(run(model, b)["ccl"], expected)
