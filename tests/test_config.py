from pathlib import Path

import pytest

from codemae.config import Config, load_config
from codemae.errors import ConfigError


def test_yaml_and_overrides(tmp_path: Path):
    path = tmp_path / "c.yaml"
    path.write_text("model: {backbone: vit_tiny}\ndata: {sources: [{kind: synthetic}]}\n")
    cfg = load_config(path, ["train.base_lr=1e-3", "data.sources.0.root=/x", "train.betas=[0.8, 0.9]"])
    assert isinstance(cfg, Config)
    assert cfg.model.backbone == "vit_tiny"
    assert cfg.train.base_lr == 1e-3 and cfg.train.betas == [0.8, 0.9]
    assert cfg.data.sources[0].root == "/x"
    assert cfg.model.img_size == 224  # default kept


@pytest.mark.parametrize("override, key", [
    (["train.lrr=1"], "train.lrr"),
    (["model.img_size=big"], "model.img_size"),
    (["method.masking=random"], "method.masking"),
    (["train.progress=3"], "train.progress"),
    (["nosuch.section.key=1"], "nosuch"),
    (["method.mask_ratio=1.0"], "method.mask_ratio"),
    (["data.batch_size=0"], "data.batch_size"),
    (["data.crop_scale=[0.5, 0.2]"], "data.crop_scale"),
    (["data.sources=[{kind: paired}]"], "data.sources.0.root"),
])
def test_bad_key_or_value_names_the_key(override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(None, override)


def test_bad_override_syntax_and_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError, match="key=value"):
        load_config(None, ["train.epochs"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "absent.yaml")
