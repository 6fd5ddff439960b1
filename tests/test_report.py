"""python -m dit.report on a small multirun: a finished run per block, an unfinished and a failed one."""

import pytest
from omegaconf import OmegaConf
from test_train import cfg_for, needs_fmnist

import train
from dit.report import main as report_main


@needs_fmnist
def test_report_of_a_multirun(tmp_path):
    multirun = tmp_path / "multirun"
    for block, steps in (("adaln_zero", 4), ("cross_attn", 4)):
        cfg = cfg_for(f"model.block={block}", f"training.total_steps={steps}", "training.log_every=1")
        (multirun / block / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, multirun / block / ".hydra" / "config.yaml", resolve=True)
        train.run(cfg, multirun / block)
    # An interrupted run (metrics but no final export) and one that failed before logging anything.
    for name, lines in (("adaln", '{"step": 2, "loss": 0.9}\n'), ("in_context", None)):
        (multirun / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg_for(f"model.block={name}"), multirun / name / ".hydra" / "config.yaml", resolve=True)
        if lines:
            (multirun / name / "metrics.jsonl").write_text(lines)
    out = tmp_path / "docs" / "ablation.md"
    out.parent.mkdir()
    out.write_text("# Ablation\n\nintro\n\n<!-- report -->\nold\n<!-- /report -->\n\nconclusion\n")
    report_main([str(multirun), "-o", str(out)])
    text = out.read_text()
    assert text.startswith("# Ablation\n\nintro") and text.rstrip().endswith("conclusion") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| adaln_zero") or line.startswith("| cross_attn")]
    assert len(rows) == 2 and all(len(r.split("|")) == 9 for r in rows)
    assert "`adaln`: unfinished: stopped at step 2 of 6" in text and "`in_context`: failed: no metrics" in text
    for png in ("ablation_loss.png", "ablation_samples.png"):
        assert (out.parent / png).exists() and f"]({png})" in text


def test_report_of_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no Hydra job directories"):
        report_main([str(tmp_path)])
