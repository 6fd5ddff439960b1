"""Fine-tuning from published weights (issue 26): init_from= with official-format and diffusers-format files made
here (random weights of the real layouts, as the interop tests do), to a new class count and a new resolution."""

import json

import pytest
import torch
from conftest import needs_fmnist, smoke_config
from helpers.tiny import randomize

import train
from dit.hub import save_export, to_diffusers
from dit.hub.export import export
from dit.models import DiT
from dit.training.digest import settings_digest
from dit.training.init_from import initialize

DEBUG4 = dict(size="Debug/4", in_channels=1, input_size=32, num_classes=10)  # the smoke run's model (Fashion-MNIST)


def source(**kw) -> DiT:
    return randomize(DiT(**{**DEBUG4, **kw}), 0.2, seed=1).eval()


def official_pt(tmp_path, model: DiT):
    path = tmp_path / "DiT-Debug-4.pt"
    torch.save(model.state_dict(), path)  # a released official checkpoint: a plain state dict
    return path


def test_a_new_class_count_maps_classes_and_keeps_everything_else(tmp_path):
    src = source(num_classes=20)
    model = DiT(**DEBUG4)
    mapping = [2 * i + 1 for i in range(10)]
    done = initialize(model, official_pt(tmp_path, src), class_map=mapping)
    a, b = src.state_dict(), model.state_dict()
    table = "y_embedder.embedding_table.weight"
    for key in b:
        if key != table:
            assert torch.equal(a[key], b[key]), key
    assert torch.equal(b[table][:10], a[table][mapping]) and torch.equal(b[table][10], a[table][20])  # null kept
    assert [(r.action, r.key) for r in done.rows] == [("resized", table)]
    assert done.kept == len(b) - 1 and done.format == "official" and done.class_map == mapping
    assert "resized    y_embedder.embedding_table.weight  [21, 64] -> [11, 64]" in done.table()


def test_without_a_class_map_the_class_rows_are_reinitialised_and_the_null_row_kept(tmp_path):
    src, model = source(num_classes=20), DiT(**DEBUG4)
    fresh = model.state_dict()["y_embedder.embedding_table.weight"].clone()
    done = initialize(model, official_pt(tmp_path, src))
    table = model.state_dict()["y_embedder.embedding_table.weight"]
    assert torch.equal(table[:10], fresh[:10])
    assert torch.equal(table[10], src.state_dict()["y_embedder.embedding_table.weight"][20])
    assert "class rows re-initialised (20 -> 10 classes" in done.table()


def test_output_channels_keep_the_epsilon_half_and_input_channels_reset(tmp_path):
    src = source(learn_sigma=True)
    model = DiT(**{**DEBUG4, "learn_sigma": False})  # e.g. a flow-matching fine-tune of a DDPM model
    done = initialize(model, official_pt(tmp_path, src))
    w_src = src.state_dict()["final_layer.linear.weight"].unflatten(0, (16, 2))
    w = model.state_dict()["final_layer.linear.weight"].unflatten(0, (16, 1))
    assert torch.equal(w[:, 0], w_src[:, 0])  # per patch position (p, p, C): channel 0 of 2
    assert {r.key for r in done.rows} == {"final_layer.linear.weight", "final_layer.linear.bias"}
    rgb = DiT(**{**DEBUG4, "in_channels": 3})
    done = initialize(rgb, official_pt(tmp_path, src))
    assert {(r.action, r.key) for r in done.rows} == {
        ("reset", "x_embedder.proj.weight"),
        ("reset", "final_layer.linear.weight"),
        ("reset", "final_layer.linear.bias"),
    }


def test_what_does_not_correspond_is_refused_naming_the_setting(tmp_path):
    pt = official_pt(tmp_path, source())
    with pytest.raises(ValueError, match="model.hidden_size=64, this run model.hidden_size=96"):
        initialize(DiT(**{**DEBUG4, "size": None, "hidden_size": 96, "depth": 2, "num_heads": 2, "patch_size": 4}), pt)
    ours = tmp_path / "cross"
    save_export(ours, source(block="cross_attn"))
    with pytest.raises(ValueError, match="it has model.block=cross_attn, this run model.block=adaln_zero"):
        initialize(DiT(**DEBUG4), ours)
    with pytest.raises(ValueError, match="init_from_class_map has 3 entries; this model has 10 classes"):
        initialize(DiT(**DEBUG4), pt, class_map=[0, 1, 2])
    with pytest.raises(ValueError, match=r"init_from_class_map\[0\]='Tulip': not a class of the source"):
        initialize(DiT(**DEBUG4), pt, class_map=["Tulip"] + list(range(9)))
    with pytest.raises(FileNotFoundError, match="init_from=nowhere.pt: no such file"):
        initialize(DiT(**DEBUG4), "nowhere.pt")


def test_a_hub_id_without_network_is_one_line(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # an empty cache: nothing to find offline
    with pytest.raises(FileNotFoundError, match="as a Hub id it could not be fetched") as e:
        initialize(DiT(**DEBUG4), "facebook/DiT-XL-2-256")
    assert "\n" not in str(e.value)


def test_the_digest_tells_a_fine_tune_from_a_run_from_scratch():
    base = {"seed": 0, "model": {}, "data": {}, "diffusion": None, "optim": {}, "training": {}}
    assert settings_digest({**base, "init_from": None}) == settings_digest(base)  # recorded runs keep their digest
    assert settings_digest({**base, "init_from": "a.pt"}) != settings_digest(base)


@needs_fmnist
def test_fine_tune_from_an_official_checkpoint_to_new_classes_through_train_py(tmp_path):
    """optim.lr=0: the run's weights at the end are what it started from, so the EMA export equals the adapted
    source exactly; the run records the source in its export and checkpoints."""
    src = source(num_classes=20)
    pt = official_pt(tmp_path, src)
    mapping = list(range(10, 20))
    cfg = smoke_config(f"init_from={pt}", f"init_from_class_map=[{','.join(map(str, mapping))}]", "optim.lr=0")
    result = train.run(cfg, tmp_path / "run")
    assert result["step"] == 6
    expected = DiT(**DEBUG4)
    initialize(expected, pt, class_map=mapping)
    for name, tensor in expected.state_dict().items():
        assert torch.equal(result["ema"].state_dict()[name], tensor), name
    record = json.loads((tmp_path / "run" / "model" / "config.json").read_text())["init_from"]
    assert record["source"] == str(pt) and record["class_map"] == mapping and record["format"] == "official"
    ckpt = json.loads((tmp_path / "run" / "checkpoints" / "step_0000006" / "config.json").read_text())
    assert ckpt["init_from"] == record

    out, _ = export(tmp_path / "run", tmp_path / "shared", say=lambda line: None)  # the model card names it
    assert f"Fine-tuned from {pt}." in (out / "README.md").read_text()
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000003" / "trainer_state.json").read_text())
    assert state["ema_num_updates"] == 3  # the step, the EMA and the data started fresh (not the source's)


@needs_fmnist
def test_fine_tune_from_a_diffusers_model_to_a_new_resolution_trains_samples_and_resumes(tmp_path):
    src = source(input_size=16, timestep_freq_shift=1)  # diffusers' timestep embedding
    to_diffusers(src).save_pretrained(tmp_path / "transformer")
    folder = tmp_path / "transformer"
    with pytest.raises(ValueError, match="model.timestep_freq_shift=1, this run model.timestep_freq_shift=0"):
        train.run(smoke_config(f"init_from={folder}"), tmp_path / "refused")
    run = tmp_path / "run"
    overrides = [f"init_from={folder}", "model.timestep_freq_shift=1"]
    first = train.run(smoke_config(*overrides, "training.total_steps=3"), run)
    assert (run / "samples" / "latest.png").exists() and first["step"] == 3
    assert first["model"].pos_embed.shape == (1, 64, 64)  # the 8x8 grid of 32x32 inputs (the source: 4x4)
    fresh = DiT(**{**DEBUG4, "timestep_freq_shift": 1})
    done = initialize(fresh, folder)  # what the run started from: the source's tensors, but the positions
    for key, tensor in fresh.state_dict().items():
        assert torch.equal(tensor, src.state_dict()[key]) == (key != "pos_embed"), key
    assert done.format == "diffusers" and [r.action for r in done.rows] == ["recomputed"]
    folder.rename(tmp_path / "gone")  # resuming reads the checkpoint, not the source
    second = train.run(smoke_config(*overrides), run)
    assert second["step"] == 6
    record = json.loads((run / "model" / "config.json").read_text())["init_from"]
    assert record["source"] == str(folder) and record["format"] == "diffusers"
    assert {c["key"]: c["action"] for c in record["changed"]} == {"pos_embed": "recomputed"}
