import pytest
import torch

from codemae.masking import modality_masks, num_visible, random_mask


@pytest.mark.parametrize("ratio, n, keep", [(0.75, 196, 49), (0.75, 16, 4), (0.5, 64, 32), (0.0, 9, 9)])
def test_visible_count(ratio, n, keep):
    mask = random_mask(3, n, ratio, generator=torch.Generator().manual_seed(0))
    assert num_visible(n, ratio) == keep
    assert mask.ids_keep.shape == (3, keep)
    assert (mask.mask.sum(1) == n - keep).all()
    # visible positions are exactly the unmasked ones
    assert (torch.gather(mask.mask, 1, mask.ids_keep) == 0).all()
    # ids_restore inverts the shuffle
    shuffled = torch.cat([mask.ids_keep, torch.zeros(3, n - keep, dtype=torch.long)], 1)
    restored = torch.gather(shuffled, 1, mask.ids_restore)
    assert (restored[mask.mask == 0].sort().values == mask.ids_keep.sort(1).values.flatten().sort().values).all()


def test_masks_differ_per_sample_and_reject_bad_ratio():
    mask = random_mask(8, 64, 0.75, generator=torch.Generator().manual_seed(0))
    assert len({tuple(row.sort().values.tolist()) for row in mask.ids_keep}) == 8
    with pytest.raises(ValueError):
        random_mask(1, 16, 1.0)


def test_consistent_and_independent():
    g = torch.Generator().manual_seed(1)
    same = modality_masks(["opt", "sar"], 4, 64, 0.75, "consistent", generator=g)
    assert torch.equal(same["opt"].ids_keep, same["sar"].ids_keep)
    diff = modality_masks(["opt", "sar"], 4, 64, 0.75, "independent", generator=g)
    assert diff["opt"].ids_keep.shape == diff["sar"].ids_keep.shape
    assert not torch.equal(diff["opt"].mask, diff["sar"].mask)
