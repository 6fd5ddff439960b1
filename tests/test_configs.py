"""Hydra configs and the Python registry agree; every config composes and instantiates."""

import re
from pathlib import Path

import pytest
import torch
from conftest import compose_config
from helpers.tiny import EACH_SIZE_AND_EACH_BLOCK, needs_overrides
from hydra.utils import instantiate
from omegaconf import OmegaConf

from dit.models import BLOCKS, DIT_MODELS, MLPS, NORMS, POS_EMBEDS, config_name, get_block
from train import build

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_model_configs_do_not_copy_the_zoo():
    """One model config; the sizes come from dit/models/sizes.py (model.size), not from files that copy it."""
    assert {p.name for p in (CONFIGS / "model").glob("*.yaml")} == {"dit.yaml"}
    text = (CONFIGS / "model" / "dit.yaml").read_text()
    for size in DIT_MODELS.values():
        assert f"depth: {size['depth']}" not in text and f"hidden_size: {size['hidden_size']}" not in text


def test_model_size_and_the_per_size_spelling_compose_alike():
    for name in ("DiT-XL/2", "DiT-Ti/4", "DiT-Debug/8"):
        a = compose_config("train", ["model=dit", f"model.size={name[4:]}"]).model
        b = compose_config("train", [f"model={config_name(name)}"]).model
        assert OmegaConf.to_container(a, resolve=True) == OmegaConf.to_container(b, resolve=True)
        assert a.name == name and a.depth == DIT_MODELS[name]["depth"]


def test_bad_model_values_fail_at_composition_with_the_valid_ones():
    """Enum-typed options are checked when the config is composed, before anything is built."""
    for key, valid in (("norm", NORMS), ("mlp", MLPS), ("pos_embed", POS_EMBEDS)):
        with pytest.raises(Exception, match=f"Error merging override model.{key}=bogus") as err:
            compose_config("train", ["model=dit_debug4", f"model.{key}=bogus"])
        assert f"Invalid value 'bogus', expected one of [{', '.join(valid)}]" in str(err.value.__cause__)
    with pytest.raises(Exception, match=r"unknown model size 'XXL/2'; valid sizes: Debug/2, Debug/4"):
        OmegaConf.to_container(compose_config("train", ["model=dit", "model.size=XXL/2"]), resolve=True)
    with pytest.raises(Exception, match="Error merging override model.depth=deep") as err:
        compose_config("train", ["model=dit_debug4", "model.depth=deep"])
    assert "Value 'deep' of type 'str' could not be converted to Integer" in str(err.value.__cause__)


def test_closed_training_choices_fail_at_composition_with_the_valid_ones():
    """The training and optimiser settings with a fixed set of values are Enums too: a bad value is refused when the
    config is composed, naming the valid ones (no hand-written check in the loop)."""
    for override, valid in (
        ("training.mixed_precision=fp8", "no, bf16, fp16"),
        ("training.nan_policy=sometimes", "stop, skip, rollback"),
        ("optim.decay=step", "constant, cosine, linear"),
        ("optim.name=sgd", "adamw, muon"),
        ("optim.muon_adjust_lr=sometimes", "match_rms_adamw, original"),
    ):
        with pytest.raises(Exception, match=f"Error merging override {override}") as err:
            compose_config("train", ["experiment=smoke", override])
        assert f"expected one of [{valid}]" in str(err.value.__cause__)
    cfg = compose_config("train", ["experiment=smoke", "training.mixed_precision=bf16", "optim.decay=cosine"])
    training, optim = OmegaConf.to_object(cfg.training), OmegaConf.to_object(cfg.optim)
    assert (training.mixed_precision, optim.decay) == ("bf16", "cosine")  # str Enums: compared and saved as text


def test_a_size_field_against_the_size_is_refused_and_a_custom_size_builds():
    cfg = compose_config("train", ["model=dit", "model.size=S/2", "model.depth=4"])
    with pytest.raises(ValueError, match=r"model.depth=4 but size S/2 has 12: set model.size=null"):
        build(cfg.model)  # train.py's instantiate: our message, not Hydra's wrapper
    custom = ["model.size=null", "model.depth=3", "model.hidden_size=64", "model.num_heads=4", "model.patch_size=4"]
    cfg = compose_config("train", ["model=dit", *custom])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert (len(model.blocks), model.config.hidden_size, model.name) == (3, 64, None)
    with pytest.raises(ValueError, match=r"model num_heads not set: give them, or a zoo size"):
        build(compose_config("train", ["model=dit", *custom[:-2], "model.patch_size=4"]).model)


def test_defaults_compose_to_the_paper_model():
    cfg = compose_config("train", ["model=dit_xl2"]).model
    assert (cfg.block, cfg.norm, cfg.qk_norm, cfg.mlp, cfg.pos_embed) == (
        "adaln_zero",
        "layernorm",
        False,
        "gelu",
        "sincos",
    )


@pytest.mark.parametrize("name", list(DIT_MODELS))
def test_config_agrees_with_registry(name):
    cfg = compose_config("train", [f"model={config_name(name)}"]).model
    assert cfg.name == name
    for key, value in DIT_MODELS[name].items():
        assert cfg[key] == value, key


@pytest.mark.parametrize(("name", "block"), EACH_SIZE_AND_EACH_BLOCK)
def test_any_size_and_any_block_instantiate(name, block):
    """Through Hydra, each size and each block (tests/test_models.py builds the whole size x block product)."""
    cfg = compose_config("train", [f"model={config_name(name)}", f"model.block={block}", *needs_overrides(block)])
    with torch.device("meta"):
        model = instantiate(cfg.model)
    assert model.block == block and model.name == name
    assert model.in_channels == cfg.data.in_channels and model.num_classes == cfg.data.num_classes


@pytest.mark.parametrize("block", sorted(BLOCKS))
def test_every_block_with_the_modern_options_instantiates(block):
    options = ["model.qk_norm=true", "model.mlp=swiglu", "model.pos_embed=rope"]
    if get_block(block).statistics is None:  # adain, cbn, ...: their own normalisation, norm=rmsnorm is refused
        options.append("model.norm=rmsnorm")
    cfg = compose_config("train", ["model=dit_debug4", f"model.block={block}", *options, *needs_overrides(block)])
    model = instantiate(cfg.model)
    assert model.config.qk_norm is True and model.config.pos_embed == "rope"


@pytest.mark.parametrize("key", ["norm", "mlp", "pos_embed", "block", "qk_norm"])
def test_unknown_option_value_lists_the_valid_ones(key):
    with pytest.raises(Exception) as err:  # at composition (typed options) or when built (block, an open registry)
        instantiate(compose_config("train", ["model=dit_debug4", f"model.{key}=bogus"]).model)
    assert re.search(r"bogus.*(valid|expected one of)", f"{err.value} {err.value.__cause__}")
