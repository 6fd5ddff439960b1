"""docs/extending.md, "Adding a block": one class plus one registry line, and the whole framework has it."""

import json

import pytest
import torch
import torch.nn as nn
from conftest import compose_config, needs_fmnist

import train
from dit.hub import load_model
from dit.models import BLOCKS, create_model
from dit.models.blocks import AdaLNZeroBlock, Block, block_mlp, self_attention
from dit.models.config import DiTConfig
from dit.zoo import count


class FiLMBlock(Block):
    """The example of docs/extending.md: FiLM (Perez et al. 2018) on un-normalised tokens, gated like
    adaLN-Zero; no norm at all."""

    name = "film_example"

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.attn = self_attention(config)
        self.mlp = block_mlp(config)
        self.film = nn.Sequential(nn.SiLU(), nn.Linear(config.hidden_size, 6 * config.hidden_size))

    condition = staticmethod(AdaLNZeroBlock.condition)  # c = t_emb + y_emb, (N, D)
    final_layer = staticmethod(AdaLNZeroBlock.final_layer)  # adaptive, zero-initialised

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.film(c).unsqueeze(1).chunk(6, dim=2)
        x = x + gate1 * self.attn(x * (1 + scale1) + shift1)
        return x + gate2 * self.mlp(x * (1 + scale2) + shift2)

    def initialize_conditioning(self) -> None:
        nn.init.zeros_(self.film[-1].weight)
        nn.init.zeros_(self.film[-1].bias)


@pytest.fixture
def film_registered():
    BLOCKS.add(FiLMBlock)  # the one registry line (in the tree: an entry of BLOCKS in dit/models/blocks/__init__.py)
    yield FiLMBlock
    BLOCKS.remove(FiLMBlock.name)


def test_a_new_block_is_in_the_zoo_the_configs_and_the_study(film_registered):
    model = create_model("DiT-Debug/4", block="film_example", input_size=16, in_channels=1, num_classes=10)
    assert all(isinstance(b, FiLMBlock) for b in model.blocks)
    x, t, y = torch.randn(2, 1, 16, 16), torch.tensor([1, 500]), torch.tensor([3, 10])
    assert model(x, t, y).abs().max() == 0  # zero-initialised gates and final layer: identity blocks, output 0
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    out = model(x, t, y)
    out.square().mean().backward()
    assert model.blocks[0].film[-1].weight.grad.abs().sum() > 0  # the condition reaches the block
    # The zoo counts it, Hydra accepts it, and the conditioning study's recipe trains it (a study of its own).
    assert count("DiT-Debug/4", "film_example", 16, 1, 10)["params"] == sum(p.numel() for p in model.parameters())
    cfg = compose_config("train", ["model=dit_debug4", "model.block=film_example"])
    assert cfg.model.block == "film_example"
    recipe = compose_config("train", ["experiment=conditioning_cpu", "model.block=film_example"])
    assert recipe.model.block == "film_example" and recipe.training.total_steps == 4000


@needs_fmnist
def test_a_new_block_trains_exports_and_loads(tmp_path, film_registered):
    cfg = compose_config("train", ["experiment=smoke", "model.block=film_example"])
    result = train.run(cfg, tmp_path)
    assert result["step"] == 6
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model"]["block"] == "film_example"
    model, _ = load_model(tmp_path / "model")
    assert isinstance(model.blocks[0], FiLMBlock)
    for k, v in result["ema"].state_dict().items():
        torch.testing.assert_close(model.state_dict()[k], v)
