"""The committed study runs still describe what today's configs would train: for each run with a finished.json,
its recorded overrides composed with the current configs give the settings digest it recorded. A refactor that
changed what a study trains (a default, a schema field, a size) fails here, before `make ablation` retrains it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from dit.training.run import settings_digest

RUNS = sorted(p.parent for p in (ROOT / "studies").rglob("finished.json") if (p.parent / ".hydra").is_dir())


def test_the_committed_studies_have_runs():
    assert len(RUNS) >= 24, RUNS


@pytest.mark.parametrize("run", RUNS, ids=[str(r.relative_to(ROOT / "studies")) for r in RUNS])
def test_committed_run_settings_unchanged(run: Path):
    recorded = yaml.safe_load((run / ".hydra" / "overrides.yaml").read_text())
    overrides = [o for o in recorded if not o.startswith("hydra")]
    cfg = compose_config("train", overrides)
    digest = settings_digest(OmegaConf.to_container(cfg, resolve=True))
    assert digest == json.loads((run / "finished.json").read_text())["settings"], overrides
