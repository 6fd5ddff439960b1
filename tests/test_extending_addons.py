"""Adding a training accelerator is one add-on class, its settings as a TrainConfig field, and one registry line
(docs/extending.md, "A new training accelerator"): the example, a dispersive loss (Wang & He 2025), is checked against
float64 arithmetic, trains through the Trainer with its term logged, resumes exactly, and is not built at weight 0;
the loop never names it."""

import dataclasses
import json
import re
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn as nn
from conftest import ROOT, needs_fmnist, smoke_config
from helpers.tiny import records, tiny_dit

import train
from dit.training import TrainConfig, Trainer
from dit.training.addons import ADDONS, Addon, build_addons


@dataclass
class DispersiveConfig:
    """``training.dispersive_example``: weight 0 = off."""

    weight: float = 0.0  # lambda (the paper: 0.25 to 1)
    block: int = 1  # disperse the output of this block (1-based)
    temperature: float = 0.5

    @property
    def enabled(self) -> bool:
        return self.weight > 0


class Dispersive(Addon):
    """The example of docs/extending.md: the dispersive loss (Wang & He 2025, InfoNCE with squared L2 distances and
    no positive pairs): the hidden tokens of one block are pushed apart across the batch,
    log mean_ij exp(-||z_i - z_j||^2 / (D tau)). No parameters: nothing is wrapped or exported."""

    name = "dispersive_example"  # training.dispersive_example
    terms = ("dispersive",)

    @classmethod
    def check(cls, settings: DispersiveConfig, model: nn.Module, dataset, cfg) -> None:
        if not 1 <= settings.block <= len(model.blocks):
            raise ValueError(f"training.dispersive_example.block={settings.block}: need 1 <= block <= depth")

    def wrap(self, model: nn.Module, device: torch.device, seed: int) -> nn.Module:
        model.blocks[self.settings.block - 1].register_forward_hook(self._keep)
        return model

    def _keep(self, module, args, output) -> None:
        self.hidden = output if module.training else None

    def add_losses(self, terms: dict[str, torch.Tensor], images: torch.Tensor | None) -> None:
        z = self.hidden.flatten(1).float()  # (N, T * D)
        distances = torch.cdist(z, z).square() / z.shape[1]
        value = torch.logsumexp(-distances.flatten() / self.settings.temperature, 0) - 2 * np.log(len(z))
        terms["dispersive"] = value.expand(len(z))  # one value for the batch, as a per-sample term
        terms["loss"] = terms["loss"] + self.settings.weight * terms["dispersive"]


@dataclass
class ExampleTrainConfig(TrainConfig):  # in the tree: the field in TrainConfig itself (dit/training/config.py)
    dispersive_example: DispersiveConfig = field(default_factory=DispersiveConfig)


@pytest.fixture
def registered():
    ADDONS.add(Dispersive)  # the one registry line (in the tree: an entry of the ADDONS list)
    try:
        yield
    finally:
        ADDONS.remove(Dispersive.name)


def with_dispersive(job, **settings):
    """The job with its training settings extended by the add-on's field."""
    t = job.training
    kept = {f.name: getattr(t, f.name) for f in dataclasses.fields(TrainConfig)}
    return dataclasses.replace(
        job, training=ExampleTrainConfig(**kept, dispersive_example=DispersiveConfig(**settings))
    )


def test_the_dispersive_term_is_the_paper_s_formula():
    model = tiny_dit().train()
    addon = Dispersive(DispersiveConfig(weight=0.5, block=2, temperature=0.5))
    assert addon.wrap(model, torch.device("cpu"), seed=0) is model
    x, t, y = torch.randn(5, 3, 16, 16), torch.randint(0, 1000, (5,)), torch.randint(0, 10, (5,))
    model(x, t, y)
    terms = {"loss": torch.zeros(5)}
    addon.add_losses(terms, None)
    z = addon.hidden.detach().flatten(1).double().numpy()
    d = ((z[:, None] - z[None]) ** 2).sum(-1) / z.shape[1]
    expected = np.log(np.exp(-d / 0.5).mean())
    np.testing.assert_allclose(terms["dispersive"].detach().numpy(), np.full(5, expected), rtol=1e-5)
    np.testing.assert_allclose(terms["loss"].detach().numpy(), 0.5 * np.full(5, expected), rtol=1e-5)
    assert expected < 0  # spread tokens give a negative term; identical ones would give 0, the maximum
    with pytest.raises(ValueError, match="dispersive_example.block=9"):
        Dispersive.check(DispersiveConfig(weight=0.5, block=9), model, None, None)


@needs_fmnist
def test_a_new_addon_trains_logs_its_term_and_resumes_exactly(registered, tmp_path):
    def job(run, steps, **settings):
        cfg = smoke_config(f"training.total_steps={steps}", "training.ckpt_every=2", "training.log_every=1")
        return with_dispersive(train.build_job(cfg, tmp_path / run), **settings)

    full = Trainer(job("full", 4, weight=0.5, block=1)).fit()
    logged = [r for r in records(tmp_path / "full") if "loss" in r]
    assert len(logged) == 4 and all(r["dispersive"] < 0 for r in logged)
    Trainer(job("half", 2, weight=0.5, block=1)).fit()
    resumed = Trainer(job("half", 4, weight=0.5, block=1)).fit()
    for k, v in full["ema"].state_dict().items():
        assert torch.equal(resumed["ema"].state_dict()[k], v), k
    off = job("off", 4)  # weight 0: checked, not built; the loop runs the plain recipe
    assert build_addons(off.training, off.model, off.dataset) == []
    plain = train.run(smoke_config("training.total_steps=4", "training.ckpt_every=2"), tmp_path / "plain")
    w = "blocks.0.attn.qkv.weight"
    assert not torch.equal(full["model"].state_dict()[w], plain["model"].state_dict()[w])
    assert (
        json.loads((tmp_path / "full" / "model" / "config.json").read_text())["model"]
        == plain["model"].config.architecture()
    )


def test_the_loop_never_names_an_addon():
    """The loop, the optimiser and the model-file loader reach add-ons through the protocol only."""
    for path in ("dit/training/loop.py", "dit/training/optim.py", "dit/hub/files.py"):
        text = (ROOT / path).read_text()
        assert not re.search(r"\b(repa|tread|token_routing|dispersive)", text, flags=re.I), path
