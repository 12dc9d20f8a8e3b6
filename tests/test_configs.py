"""Every shipped config loads, validates and builds its method (full-size ones on the meta device)."""

from pathlib import Path

import pytest
import torch

from codemae.config import load_config
from codemae.errors import ConfigError
from codemae.methods import build_method

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds(path):
    cfg = load_config(path)
    with torch.device("meta"):
        method = build_method(cfg)
    assert method.encoder.patch_size == cfg.model.patch_size


def test_ablation_rows_switch_what_table_ii_says():
    root = CONFIG_DIR / "ablations"
    row = lambda name: load_config(root / f"{name}.yaml")  # noqa: E731
    assert {s.kind for s in row("IIa_1_paired_only").data.sources} == {"paired"}
    assert {s.kind for s in row("IIa_2_unpaired_only").data.sources} == {"opt", "sar"}
    b1 = row("IIb_1_independent_encoders_decoders").method
    assert (b1.name, b1.encoder, b1.decoder, b1.okd) == ("mae", "independent", "independent", False)
    b4 = row("IIb_4_okd_shared_encoder").method
    assert (b4.encoder, b4.decoder, b4.okd, b4.ccl, b4.cdr) == ("shared", "independent", True, "none", False)
    full = row("IIc_4_okd_ccl_cdr")
    assert (full.method.ccl, full.method.cdr, full.method.cdr_target, full.train.epochs) == ("cross_attention", True,
                                                                                            "gray", 100)
    assert row("IId_hog").method.cdr_target == "hog" and row("IIe_mlp").method.ccl == "mlp"
    base = load_config(root.parent / "pretrain" / "codemae_base.yaml")
    assert (base.model.backbone, base.model.img_size, base.method.decoder_depth, base.train.epochs) == \
        ("hivit_base", 224, 8, 800)
    assert base.data.batch_size * 2 * 8 == 2048 and base.train.betas == [0.9, 0.95]


def test_mae_refuses_codemae_switches():
    with pytest.raises(ConfigError, match="method.name"):
        load_config(None, ["method.cdr=true"])
