"""Hydra configs and the Python registry agree; every config composes and instantiates."""

from pathlib import Path

import pytest
import torch
from conftest import compose_config
from hydra.utils import instantiate

from dit.models import BLOCKS, DIT_MODELS, MLPS, NORMS, POS_EMBEDS, config_name

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def compose_train(overrides=()):
    return compose_config("train", overrides)


def test_every_registry_entry_has_a_config_and_back():
    files = {p.stem for p in (CONFIGS / "model").glob("*.yaml")} - {"base"}  # base.yaml: shared by every size
    assert files == {config_name(n) for n in DIT_MODELS}


def test_base_config_documents_every_block_and_option():
    """The comments in base.yaml list the valid values, and agree with the registries."""
    lines = {line.split(":")[0]: line for line in (CONFIGS / "model" / "base.yaml").read_text().splitlines() if ":" in line}
    for key, valid in (("block", BLOCKS), ("norm", NORMS), ("mlp", MLPS), ("pos_embed", POS_EMBEDS), ("qk_norm", ("false", "true"))):
        for value in valid:
            assert value in lines[key].split("#", 1)[1], (key, value)


def test_defaults_compose_to_the_paper_model():
    cfg = compose_train(["model=dit_xl2"]).model
    assert (cfg.block, cfg.norm, cfg.qk_norm, cfg.mlp, cfg.pos_embed) == ("adaln_zero", "layernorm", False, "gelu", "sincos")


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


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_block_with_the_modern_options_instantiates(block):
    options = ["model.qk_norm=true", "model.mlp=swiglu", "model.pos_embed=rope"]
    if block != "adain":  # adain's norm is its instance norm: norm=rmsnorm is refused (tests/test_zoo_blocks.py)
        options.append("model.norm=rmsnorm")
    cfg = compose_train(["model=dit_debug4", f"model.block={block}", *options])
    model = instantiate(cfg.model)
    assert model.config["qk_norm"] is True and model.config["pos_embed"] == "rope"


@pytest.mark.parametrize("key", ["norm", "mlp", "pos_embed", "block", "qk_norm"])
def test_unknown_option_value_lists_the_valid_ones(key):
    cfg = compose_train(["model=dit_debug4", f"model.{key}=bogus"])
    with pytest.raises(Exception, match=r"bogus.*valid"):
        instantiate(cfg.model)
