"""End to end on ../shared/data: every method's config pretrains and its losses fall (slow)."""

import statistics
from pathlib import Path

import pytest

from codemae.cli import main
from codemae.train.metrics import NOT_LOSSES, read_metrics

from conftest import shared_data

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "pretrain"
CASES = {
    "mae_hivit_tiny_s1s2": [],
    "codemae_tiny": ["method.okd=false"],  # its OKD teacher is a checkpoint the user makes first
    "rigid_mlp_s1s2": [],
    "fusmae_xad_s1s2": [],
    "fusmae_xaed_s1s2": [],
    "codemae_s1s2_mstar": ["train.epochs=2"],  # paired S1/S2 + unpaired MSTAR SAR
    "fusmae_sen1floods11": [],  # 13-band optical, VV/VH SAR
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_method_pretrains_on_real_pairs_with_falling_losses(tmp_path, name):
    data = shared_data("")
    args = [f"run_dir={tmp_path}", f"data.root={data}", "train.epochs=3", "train.warmup_epochs=1",
            "train.log_every=2", "train.progress=false", "data.num_workers=1", *CASES[name]]
    assert main(["pretrain", "--config", str(CONFIGS / f"{name}.yaml"), *args]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    terms = [k for k in dict.fromkeys(k for r in rows for k in r) if k not in NOT_LOSSES]
    for term in terms:
        have = [r[term] for r in rows if term in r]  # contrastive terms only on paired batches
        first, last = statistics.mean(have[:5]), statistics.mean(have[-5:])
        assert last < first, f"{name}: {term} did not fall ({first:.3f} -> {last:.3f})"
