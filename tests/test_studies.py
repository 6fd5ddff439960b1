"""The committed study runs still describe what today's configs would train: for each run with a finished.json,
its recorded overrides composed with the current configs give the settings digest it recorded. A refactor that
changed what a study trains (a default, a schema field, a size) fails here, before `make ablation` retrains it.
And every study's report is where one rule puts it: studies/<name>/report.md, rendered from its runs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, compose_config
from omegaconf import OmegaConf

from dit.analysis.report import main as report_main
from dit.training.digest import settings_digest

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


def test_every_study_report_is_in_its_study():
    """A study with runs in the Hydra layout has its generated report in its own folder; no page of docs/ holds a
    generated report (they discuss one and link to it)."""
    studies = sorted({run.parent.parent for run in RUNS})
    assert studies and all((study / "report.md").is_file() for study in studies), studies
    for page in sorted((ROOT / "docs").glob("*.md")):
        assert "<!-- report -->" not in page.read_text(), page


def test_a_committed_report_renders_again_byte_for_byte(tmp_path, monkeypatch):
    """The smallest study's report.md and its figures, rendered again from its committed runs, are the committed
    files byte for byte (numbers, layout and matplotlib's PNGs)."""
    study = Path("studies") / "ablation_adain_6k"
    monkeypatch.chdir(ROOT)  # the report names its study by the path it is given
    report_main([str(study), "-o", str(tmp_path / "report.md")])
    committed = sorted((ROOT / study).glob("report*"))
    assert [p.name for p in committed] == sorted(p.name for p in tmp_path.iterdir())
    for path in committed:
        assert (tmp_path / path.name).read_bytes() == path.read_bytes(), path.name
