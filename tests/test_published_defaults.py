"""Each published behaviour of issue-13's list is codemae's default, or an option whose default it is."""

from __future__ import annotations

import pytest
import torch

from codemae.methods import build_method

from conftest import tiny_config

CODEMAE = {"name": "codemae", "okd": True, "teacher": {"dim": 24}, "ccl": "cross_attention", "cdr": True}


def make(tmp_path, model=None, **method):
    torch.manual_seed(0)
    return build_method(tiny_config(tmp_path, model=model or {}, method={**CODEMAE, **method}))


@pytest.mark.parametrize("per_level, copies", [(True, 3), (False, 1)])
def test_masked_positions_carry_one_mask_token_per_pyramid_level(tmp_path, per_level, copies):
    method = make(tmp_path, mask_token_per_level=per_level)
    decoder = method.decoders["shared"]
    visible = torch.randn(2, 1, 32)
    ids_restore = torch.tensor([[1, 0, 2, 3], [3, 2, 1, 0]])
    filled = decoder._unshuffle(visible, ids_restore)
    masked = filled[0, [0, 2, 3]]
    torch.testing.assert_close(masked, (copies * decoder.mask_token[0]).expand(3, -1))
    assert method.cdr_decoder.mask_copies == copies


def test_independent_decoders_have_their_own_decoder_embedding(tmp_path):
    method = make(tmp_path, decoder="independent", okd=False, ccl="none", cdr=False)
    assert set(method.decoder_embed) == set(method.decoders) == {"opt", "sar"}
    assert method.decoder_embed["opt"] is not method.decoder_embed["sar"]


def test_okd_tap_ccl_norms_and_initialisation(tmp_path):
    method = make(tmp_path, model={"depth": 4})
    assert method.aux_block == 3  # int(0.75 * 4)
    assert make(tmp_path, model={"depth": 24, "embed_dim": 32}).aux_block == 18
    assert method.ccl_heads.opt.norm_q.eps == method.ccl_heads.sar.norm_kv.eps == 1e-5
    # iTPN family: linear layers N(0, 0.02) with zero bias, inside and outside the encoder
    for layer in (method.okd_main[1], method.ccl_heads.opt.attn.q, method.encoder.blocks[0].attn.qkv):
        assert abs(layer.weight.std().item() - 0.02) < 0.005 and not layer.bias.any()
    # ViT family: MAE's xavier-uniform (bound sqrt(6 / (fan_in + fan_out)))
    vit = build_method(tiny_config(tmp_path, model={"backbone": "vit_tiny", "embed_dim": 32, "depth": 2,
                                                    "num_heads": 2}))
    weight = vit.decoders["shared"].blocks[0].mlp.fc1.weight
    assert weight.abs().max() <= (6 / sum(weight.shape)) ** 0.5 and weight.std() > 0.05
