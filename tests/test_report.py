"""python -m dit.analysis.report: a real multirun (finished, unfinished and failed runs), and the statistics of a
study (means and t intervals over seeds, Welch's test, Holm's correction) against scipy and hand-worked
numbers."""

import json
import math
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from scipy import stats
from test_train import cfg_for, needs_fmnist

import train
from dit.analysis.report import main as report_main
from dit.analysis.significance import holm, mean_ci, welch


@needs_fmnist
def test_report_of_a_multirun(tmp_path):
    multirun = tmp_path / "multirun"
    for block, steps in (("adaln_zero", 4), ("cross_attn", 4)):
        cfg = cfg_for(f"model.block={block}", f"training.total_steps={steps}", "training.log_every=1")
        (multirun / block / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg, multirun / block / ".hydra" / "config.yaml", resolve=True)
        train.run(cfg, multirun / block)
    # An interrupted run (metrics but no final export), one that failed before logging anything, and one
    # that stopped with an error train.py noted.
    for name, lines in (
        ("adaln", '{"step": 2, "loss": 0.9}\n'),
        ("in_context", None),
        ("diffit", '{"step": 1, "loss": 1.0}\n'),
    ):
        (multirun / name / ".hydra").mkdir(parents=True)
        OmegaConf.save(cfg_for(f"model.block={name}"), multirun / name / ".hydra" / "config.yaml", resolve=True)
        if lines:
            (multirun / name / "metrics.jsonl").write_text(lines)
    train.note_failure(multirun / "diffit", "FloatingPointError: non-finite loss at step 1;\nstopping")
    out = tmp_path / "docs" / "ablation.md"
    out.parent.mkdir()
    out.write_text("# Ablation\n\nintro\n\n<!-- report -->\nold\n<!-- /report -->\n\nconclusion\n")
    report_main([str(multirun), "-o", str(out), "--by", "model.block"])
    text = out.read_text()
    assert text.startswith("# Ablation\n\nintro") and text.rstrip().endswith("conclusion") and "old" not in text
    rows = [line for line in text.splitlines() if line.startswith("| adaln_zero") or line.startswith("| cross_attn")]
    assert len(rows) == 2 and all(len(r.split("|")) == 11 for r in rows)
    assert "2 of 5 runs finished" in text
    assert "`adaln`: unfinished: stopped at step 2 of 6" in text and "`in_context`: failed: no metrics" in text
    assert "`diffit`: failed at step 1 of 6: FloatingPointError: non-finite loss at step 1; stopping" in text
    assert "Fewer than two arms with two or more seeds: no significance test." in text
    assert "Not tested (fewer than two seeds with a final FID): `adaln_zero`, `cross_attn`." in text
    for png in ("ablation_loss.png", "ablation_samples.png"):
        assert (out.parent / png).exists() and f"]({png})" in text


def test_report_of_nothing(tmp_path):
    with pytest.raises(SystemExit, match="no Hydra job directories"):
        report_main([str(tmp_path)])


def test_mean_ci_and_welch_match_scipy():
    a, b = [20.1, 22.4, 19.7], [25.0, 31.2, 27.9, 26.5]
    mean, half = mean_ci(a)
    lo, hi = stats.t.interval(0.95, len(a) - 1, loc=np.mean(a), scale=stats.sem(a))
    assert mean == pytest.approx(np.mean(a)) and (mean - half, mean + half) == pytest.approx((lo, hi))
    assert mean_ci([3.0]) == (3.0, None)
    w = welch(a, b)
    ref = stats.ttest_ind(a, b, equal_var=False)
    assert w["p"] == pytest.approx(ref.pvalue) and w["diff"] == pytest.approx(np.mean(a) - np.mean(b))
    ci = ref.confidence_interval(0.95)
    assert (w["diff"] - w["ci"], w["diff"] + w["ci"]) == pytest.approx((ci.low, ci.high))


def test_welch_without_spread_is_not_a_test():
    assert math.isnan(welch([1.0, 1.0], [2.0, 2.0])["p"])
    with warnings.catch_warnings():  # one arm without spread (e.g. equal costs) is a test, and no precision warning
        warnings.simplefilter("error")
        w = welch([31.97, 31.97, 31.97], b := [32.26, 32.37, 32.40])
    assert w["df"] == pytest.approx(2.0) and w["p"] == pytest.approx(stats.ttest_1samp(b, 31.97).pvalue)


def test_fid_curve_leaves_out_the_final_fid_on_more_samples():
    from dit.training.logging import fid_curve

    old = [{"step": 1, "fid": 9.0}]  # written before records carried their sample count
    new = [
        {"step": 2, "fid": 8.0, "fid_n": 250},
        {"step": 4, "fid": 7.0, "fid_n": 250},
        {"step": 4, "fid": 6.0, "fid_n": 1000},
    ]
    assert [r["fid"] for r in fid_curve(old + new)] == [9.0, 8.0, 7.0] and fid_curve(old) == old


def test_the_conditioning_study_sweeps_its_seven_blocks_seeds_outermost():
    from conftest import compose_config

    from dit.models import BLOCKS

    params = compose_config("train", ["experiment=ablate_conditioning"], return_hydra_config=True).hydra.sweeper.params
    assert list(params) == ["seed", "model.block"] and params["seed"] == "0,1,2"
    # the seven blocks measured with the earlier classifier; the ones added since have studies of their own
    seven = ["in_context", "cross_attn", "adaln", "adaln_zero", "diffit", "adaln_single", "adain"]
    assert params["model.block"].split(",") == seven and set(seven) < set(BLOCKS)


def test_holm_step_down():
    # Worked by hand: sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04 -> running max.
    adjusted, reject = holm([0.01, 0.04, 0.03, 0.005])
    assert adjusted == pytest.approx([0.03, 0.06, 0.06, 0.02]) and reject == [True, False, False, True]
    assert holm([0.5, 0.9])[0] == pytest.approx([1.0, 1.0])  # capped at 1


def fake_run(root, block, seed, fid, loss=0.3, finished=True, consistency=0.8, extractor=None, map_iou=None):
    """A run directory as train.py leaves it: config, metrics (cheap FIDs, then the final one), export."""
    run = root / f"{block}_seed{seed}"
    (run / ".hydra").mkdir(parents=True)
    cfg = cfg_for(f"model.block={block}", f"seed={seed}", "training.total_steps=20")
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    recs = [{"step": s, "loss": loss + 0.1 * (20 - s) / 20, "images_per_s": 100.0 + seed} for s in (5, 10, 15, 20)]
    recs += [
        {"step": s, "fid": fid + 50 * (20 - s) / 20 + 5, "fid_n": 250, "class_consistency": consistency}
        for s in (10, 20)
    ]
    per_class = [0.5 + 0.1 * seed, 0.9, 1.0]  # three classes; the first one's share grows with the seed
    final = {
        "class_consistency": consistency,
        "class_consistency_min": consistency - 0.2,
        "class_consistency_per_class": per_class,
    }
    if extractor:
        final["fid_extractor"] = extractor
    if map_iou is not None:
        final["map_iou"] = map_iou
    recs.append({"step": 20, "fid": fid, "fid_n": 1000, **final})
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs if finished or r["step"] <= 10))
    if finished:
        (run / "model").mkdir()
        (run / "model" / "config.json").write_text(json.dumps({"data": {"class_names": ["shirt", "shoe", "bag"]}}))
    return run


def test_report_groups_seeds_into_arms_and_says_what_is_significant(tmp_path):
    multirun = tmp_path / "multirun"
    fids = {"adaln_zero": [20.0, 21.0, 20.5], "adaln": [60.0, 61.5, 59.0], "in_context": [19.0, 25.0, 22.0]}
    for block, values in fids.items():
        for seed, f in enumerate(values):
            fake_run(multirun, block, seed, f)
    fake_run(multirun, "cross_attn", 0, 40.0, finished=False)
    out = tmp_path / "report.md"
    report_main([str(multirun), "-o", str(out)])  # arms found by themselves: only model.block and seed vary
    text = out.read_text()
    assert (
        "arms differ in `model.block`" in text
        and "9 of 10 runs finished" in text
        and "final FID on 1000 samples" in text
    )
    table = [line.split("|") for line in text.splitlines() if line.startswith("| ") and len(line.split("|")) == 11][
        1:
    ]  # the main table
    rows = {r[1].strip(): r for r in table}
    for block, values in fids.items():
        half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / math.sqrt(3)
        assert rows[block][2].strip() == "3" and rows[block][5].strip() == f"{np.mean(values):.1f} ± {half:.1f}"
        assert rows[block][6].strip() == "80.0 ± 0.0%" and rows[block][7].strip() == "60.0 ± 0.0%"
    order = [r[1].strip() for r in table]
    assert order == ["adaln_zero", "in_context", "adaln"]  # by mean final FID
    assert "`cross_attn_seed0`: unfinished: stopped at step 10 of 20" in text
    # per class, mean over the seeds 0, 1, 2, headed by the class names the exports recorded; finished runs only
    assert "| block | shirt | shoe | bag |" in text
    for block in fids:
        assert f"| {block} | 60% | 90% | 100% |" in text
    assert "| cross_attn | " not in text.split("**Class consistency per class**")[1].split("**Which")[0]
    # the lowest class share of any seed (fake runs: the first class, 0.5 at seed 0; chance 1/3)
    assert (
        "Lowest share of any class in any seed, as a multiple of chance: `adaln_zero` 1.5x (50%, shirt, seed 0);"
        in text
    )
    # Three pairs, Holm-corrected: adaln_zero and in_context both far below adaln; the two of them not apart.
    p = {
        (a, b): stats.ttest_ind(fids[a], fids[b], equal_var=False).pvalue
        for a, b in [("adaln_zero", "in_context"), ("adaln_zero", "adaln"), ("in_context", "adaln")]
    }
    adjusted, reject = holm(list(p.values()))
    assert reject == [False, True, True]
    assert "- `adaln_zero` has a significantly lower FID than `adaln`." in text
    assert "- `in_context` has a significantly lower FID than `adaln`." in text
    assert "- Not significant (1 of 3 pairs): `adaln_zero` vs `in_context`." in text
    assert "| adaln_zero | in_context | -1.5 " in text and f"{adjusted[0]:.3g} | no |" in text
    for png in ("report_loss.png", "report_fid.png"):
        assert (tmp_path / png).exists() and f"]({png})" in text
    assert "report_samples.png" not in text  # fake runs have no sample grids


def test_report_names_the_feature_extractor_and_warns_when_runs_differ(tmp_path):
    """What measured the FIDs is in the report: the extractor (with the classifier's hash) the runs recorded;
    runs from before the classifier was shipped recorded none and are named as such; a mix is flagged."""
    from dit.analysis.runs import OLD_EXTRACTOR

    shipped = "fashion-mnist-cnn-v1@20767b53ac99/fc1-128"
    for seed in range(2):
        fake_run(tmp_path / "new", "adaln_zero", seed, 20.0 + seed, extractor=shipped)
    report_main([str(tmp_path / "new"), "-o", str(tmp_path / "new.md")])
    text = (tmp_path / "new.md").read_text()
    assert f"Measured with: `{shipped}`." in text and "different feature extractors" not in text
    fake_run(tmp_path / "mixed", "adaln_zero", 0, 20.0, extractor=shipped)
    fake_run(tmp_path / "mixed", "adaln_zero", 1, 21.0)  # an old run: no fid_extractor in its records
    report_main([str(tmp_path / "mixed"), "-o", str(tmp_path / "mixed.md")])
    text = (tmp_path / "mixed.md").read_text()
    assert f"`{OLD_EXTRACTOR}`" in text
    assert (
        f"**Warning:** the final FIDs use different feature extractors ({OLD_EXTRACTOR}, {shipped}): not comparable."
        in text
    )


CLAIMS = Path(__file__).resolve().parents[1] / "studies" / "ablation_conditioning" / "claims.yaml"


def test_report_checks_the_published_order(tmp_path):
    """DiT's three claims (adaLN-Zero below in-context, cross-attention and adaLN; the study's claims.yaml): each
    verdict from the pairs' tests."""
    multirun = tmp_path / "multirun"
    fids = {
        "adaln_zero": [30.0, 31.0, 30.5],
        "in_context": [60.0, 61.5, 59.0],  # far above: agrees, significant
        "cross_attn": [29.0, 34.0, 31.0],  # about equal: not significant (mean 31.3 > 30.5: same direction)
        "adaln": [10.0, 11.0, 10.4],  # far below: contradicts, significant
    }
    for block, values in fids.items():
        for seed, f in enumerate(values):
            fake_run(multirun, block, seed, f)
    out = tmp_path / "report.md"
    report_main([str(multirun), "-o", str(out)])
    assert "published order" not in out.read_text()  # no claims.yaml next to the runs: no claims checked
    shutil.copy(CLAIMS, multirun / "claims.yaml")
    report_main([str(multirun), "-o", str(out)])
    section = out.read_text().split("**Against the published order**")[1]
    rows = {line.split("|")[1].strip(): line.split("|") for line in section.splitlines() if line.startswith("| `")}
    assert set(rows) == {"`adaln_zero` < `in_context`", "`adaln_zero` < `cross_attn`", "`adaln_zero` < `adaln`"}
    assert rows["`adaln_zero` < `in_context`"][5].strip() == "**agrees** (significant)"
    assert (
        rows["`adaln_zero` < `in_context`"][3].strip()
        == f"{np.mean(fids['adaln_zero']) - np.mean(fids['in_context']):+.1f}"
    )
    assert rows["`adaln_zero` < `cross_attn`"][5].strip() == "same direction, not significant"
    assert rows["`adaln_zero` < `adaln`"][5].strip() == "**opposite order here** (significant)"
    assert rows["`adaln_zero` < `adaln`"][3].strip() == f"{np.mean(fids['adaln_zero']) - np.mean(fids['adaln']):+.1f}"
    assert "nearly half that of the in-context model" in rows["`adaln_zero` < `in_context`"][2]
    # an arm with one seed, and arms without spread: said, not tested
    few = tmp_path / "few"
    fake_run(few, "adaln_zero", 0, 30.0), fake_run(few, "adaln_zero", 1, 30.0)
    fake_run(few, "adaln", 0, 40.0), fake_run(few, "adaln", 1, 40.0), fake_run(few, "in_context", 0, 50.0)
    shutil.copy(CLAIMS, few / "claims.yaml")
    report_main([str(few), "-o", str(tmp_path / "few.md")])
    section = (tmp_path / "few.md").read_text().split("**Against the published order**")[1]
    assert (
        "| `adaln_zero` < `adaln` | DiT, Fig. 5 and its text" in section
        and "| -10.0 | - | not tested (no spread in either arm) |" in section
    )
    assert "| - | - | not tested (an arm has fewer than two seeds) |" in section and "cross_attn" not in section
    # a study without the claims' arms has no such section
    other = tmp_path / "other"
    for seed in (0, 1):
        fake_run(other, "diffit", seed, 20.0 + seed), fake_run(other, "adain", seed, 30.0 + seed)
    shutil.copy(CLAIMS, other / "claims.yaml")
    report_main([str(other), "-o", str(tmp_path / "other.md")])
    assert "published order" not in (tmp_path / "other.md").read_text()


def test_arms_of_two_keys_fill_one_column(tmp_path):
    """Arms that differ in two keys: each table's header has as many cells as its rows."""
    multirun = tmp_path / "multirun"
    for seed in (0, 1):
        fake_run(multirun, "adaln_zero", seed, 20.0 + seed)
        run = fake_run(multirun / "x", "adaln", seed, 40.0 + seed)  # other block and, below, other steps
        cfg = OmegaConf.load(run / ".hydra" / "config.yaml")
        cfg.optim.lr = 1e-3
        OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
        run.rename(multirun / f"adaln_lr_seed{seed}")
    out = tmp_path / "report.md"
    report_main([str(multirun), "-o", str(out)])
    text = out.read_text()
    assert "arms differ in `model.block`, `optim.lr`" in text
    for table in ("| arm | seeds |", "| arm | shirt |"):
        lines = text.split(table)[1].splitlines()
        header, separator, *rows = [table + lines[0], *lines[1:4]]
        assert len(rows) == 2 and all(r.count("|") == header.count("|") == separator.count("|") for r in rows), text
    assert "| block=adaln, lr=0.001 |" in text


@needs_fmnist
def test_publish_copies_the_results_and_restore_lets_a_sweep_skip_the_finished_runs(tmp_path):
    """publish: a run's results into studies/<name>/runs/<run>/ and nothing else (no weights, checkpoints, npz,
    logs, empty files, PNG copies); the report reads the study as it read the sweep. restore (a fresh clone): the
    published run put back into an empty sweep directory is met as finished by the training loop, not retrained."""
    from dit.analysis.study import main as study_main

    sweep, study = tmp_path / "outputs" / "studies" / "s", tmp_path / "studies" / "s"
    run = sweep / "adaln_zero_seed0"
    cfg = cfg_for("training.total_steps=4", "training.log_every=1", "training.sample_every=2", "training.ckpt_every=2")
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    (run / ".hydra" / "overrides.yaml").write_text("- training.total_steps=4\n")
    (run / ".hydra" / "hydra.yaml").write_text("hydra: {}\n")
    train.run(cfg, run)
    grids = sorted((run / "samples").glob("step_*.png"))
    assert [g.name for g in grids] == ["step_0000002.png", "step_0000004.png"] and (run / "model").is_dir()
    (run / "train.log").write_text("")  # Hydra's job log, empty: the loop logs to metrics.jsonl
    (run / "notes.md").write_text("")
    shutil.copy(grids[-1], run / "samples" / "latest.png")
    shutil.copy(grids[-1], run / "final.png")  # a byte copy under another name
    np.savez(run / "samples.npz", np.zeros(1))
    (run / "checkpoints" / "extra.json").write_text("{}")
    study_main(["publish", str(sweep), str(study)])
    published = study / "runs" / run.name
    files = sorted(str(p.relative_to(published)) for p in published.rglob("*") if p.is_file())
    assert files == [
        ".hydra/config.yaml",
        ".hydra/overrides.yaml",
        "finished.json",
        "loss.png",
        "metrics.jsonl",
        "samples/step_0000004.png",
    ], files
    for f in files:
        assert (published / f).read_bytes() == (run / f).read_bytes()
    report_main([str(sweep), "-o", str(tmp_path / "sweep.md")])
    report_main([str(study), "-o", str(tmp_path / "study.md")])  # the runs under studies/s/runs/
    from_sweep, from_study = ((tmp_path / n).read_text() for n in ("sweep.md", "study.md"))
    assert "1 of 1 runs finished" in from_study
    assert from_study.replace(f"`{study}`", f"`{sweep}`") == from_sweep.replace("sweep_", "study_")

    (published / "metrics.jsonl").write_text("edited\n")  # a result changed in the sweep: published again
    study_main(["publish", str(sweep), str(study)])
    assert (published / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    before = {p: p.stat().st_mtime_ns for p in published.rglob("*") if p.is_file()}
    study_main(["publish", str(sweep), str(study)])  # the same finished run: left as it is
    assert before == {p: p.stat().st_mtime_ns for p in published.rglob("*") if p.is_file()}

    fresh = tmp_path / "fresh" / "s"
    study_main(["restore", str(study), str(fresh)])
    assert sorted(str(p.relative_to(fresh / run.name)) for p in fresh.rglob("*") if p.is_file()) == files
    result = train.run(cfg, fresh / run.name)
    assert result["step"] == 4 and result["checkpoint"] is None  # finished: nothing trained, nothing written
    assert not (fresh / run.name / "model").exists() and not (fresh / run.name / "checkpoints").exists()
    assert (fresh / run.name / "metrics.jsonl").read_bytes() == (run / "metrics.jsonl").read_bytes()
    with pytest.raises(SystemExit, match="no run directories with results"):
        study_main(["publish", str(tmp_path / "empty"), str(study)])


def test_each_study_config_gives_the_settings_its_runs_recorded():
    """The override lists that trained a study became its experiment config: composed, the config gives the
    settings digest each committed run recorded (so a sweep of it skips them)."""
    from conftest import compose_config

    from dit.training.digest import settings_digest

    runs = sorted((Path(__file__).resolve().parents[1] / "studies" / "ablation_adain_6k" / "runs").glob("adain_seed*"))
    assert len(runs) == 3
    for run in runs:
        seed = run.name.removeprefix("adain_seed")
        cfg = compose_config("train", ["experiment=ablation_adain_6k", f"seed={seed}"])
        recorded = json.loads((run / "finished.json").read_text())["settings"]
        assert settings_digest(OmegaConf.to_container(cfg, resolve=True)) == recorded, run


def test_the_normalisation_and_silhouette_studies_sweep_their_arms_seeds_outermost():
    from conftest import compose_config

    for experiment, group, arms in [
        ("ablate_normalisation", "+normalisation", "layernorm,rmsnorm,instance,batch,group,none"),
        ("silhouette", "+silhouette", "spade,channels,tokens"),
    ]:
        cfg = compose_config("train", [f"experiment={experiment}"], return_hydra_config=True)
        assert dict(cfg.hydra.sweeper.params) == {"seed": "0,1,2", group: arms}
    # each normalisation arm composes to the conditioning recipe with only the block and the norm set
    base = compose_config("train", ["experiment=conditioning_cpu"])
    for arm, (block, norm) in {"rmsnorm": ("adaln_zero", "rmsnorm"), "batch": ("cbn", "layernorm")}.items():
        cfg = compose_config("train", ["experiment=ablate_normalisation", f"+normalisation={arm}"])
        assert (cfg.model.block, cfg.model.norm) == (block, norm)
        cfg.model.block, cfg.model.norm = base.model.block, base.model.norm
        assert cfg == base


def test_map_iou_gets_a_column_and_its_own_tests(tmp_path):
    multirun = tmp_path / "multirun"
    ious = {"adaln_zero": [0.95, 0.96, 0.955], "adaln": [0.60, 0.62, 0.61], "in_context": [0.94, 0.97, 0.955]}
    for block, values in ious.items():
        for seed, iou in enumerate(values):
            fake_run(multirun, block, seed, fid=20.0 + seed, map_iou=iou)
    report_main([str(multirun), "-o", str(tmp_path / "report.md")])
    text = (tmp_path / "report.md").read_text()
    assert "| map IoU |" in text
    row = next(line for line in text.splitlines() if line.startswith("| adaln |"))
    assert "0.610 ± 0.025" in row  # mean ± t(0.975, 2) * sd / sqrt(3) = 4.303 * 0.01 / 1.732
    lines = text.splitlines()
    table = lines[
        lines.index(
            "| higher IoU | lower IoU | difference (unadjusted 95% CI) | p (Welch) | p (Holm) | significant |"
        ) :
    ]
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in table[2:5]}
    assert "**yes**" in rows[("adaln_zero", "adaln")] and "**yes**" in rows[("in_context", "adaln")]
    assert rows[("adaln_zero", "in_context")].endswith("| no |")
    no_maps = tmp_path / "plain"
    for seed in range(2):
        fake_run(no_maps, "adaln_zero", seed, fid=20.0)
    report_main([str(no_maps), "-o", str(tmp_path / "plain.md")])
    assert "map IoU" not in (tmp_path / "plain.md").read_text()
