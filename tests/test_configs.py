"""Hydra configs and the Python registry agree; every config composes and instantiates."""

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from dit.models import BLOCKS, DIT_MODELS, config_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_train(overrides=()):
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_every_registry_entry_has_a_config_and_back():
    files = {p.stem for p in (CONFIGS / "model").glob("*.yaml")}
    assert files == {config_name(n) for n in DIT_MODELS}


@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_config_agrees_with_registry(name):
    cfg = compose_train([f"model={config_name(name)}"]).model
    assert cfg.name == name
    for key, value in DIT_MODELS[name].items():
        assert cfg[key] == value, key


@pytest.mark.parametrize("name", list(DIT_MODELS))
@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_any_size_with_any_block_instantiates(name, block):
    cfg = compose_train([f"model={config_name(name)}", f"model.block={block}"])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.block == block and model.name == name
    assert model.in_channels == cfg.data.in_channels and model.num_classes == cfg.data.num_classes
