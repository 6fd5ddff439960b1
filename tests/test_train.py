"""The training loop on CPU: smoke run, exact resume, crash safety, several processes, bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, SMOKE, compose_config, needs_fmnist, smoke_config
from helpers.tiny import records, tiny_dit, tiny_vae
from PIL import Image
from safetensors.torch import load_file

import train
from dit.data import GlobalBatchSampler
from dit.hub import load_model
from dit.training import OptimConfig, lr_at
from dit.training.checkpointing import list_checkpoints
from dit.training.ema import EMA

cfg_for = smoke_config  # tests/test_report.py imports it from here


def image_folder(root: Path, classes=("cats", "dogs"), per_class=6, size=20):
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 4, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return root


@needs_fmnist
def test_smoke_run_writes_everything(tmp_path):
    result = train.run(smoke_config("training.sample_every=3"), tmp_path)
    assert result["step"] == 6
    recs = records(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert all(np.isfinite(r["loss"]) and r["loss"] == pytest.approx(r["mse"] + r["vb"], rel=1e-5) for r in recs)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000006"]
    assert (tmp_path / "samples" / "step_0000003.png").exists() and (tmp_path / "samples" / "latest.png").exists()
    assert (tmp_path / "loss.png").exists()
    grid = Image.open(tmp_path / "samples" / "latest.png")
    assert grid.size == (2 * 34 + 2, 10 * 34 + 2)  # 10 classes x 2 per class of 32x32
    # The EMA export and the checkpoints load in sample.py's loader, EMA weights by default.
    model, meta = load_model(tmp_path / "model")
    assert meta["class_names"][7] == "Sneaker" and not meta["latent"] and model.in_channels == 1
    ema = load_file(tmp_path / "model" / "ema.safetensors")
    for k, v in result["ema"].state_dict().items():
        torch.testing.assert_close(ema[k], v)
    load_model(list_checkpoints(tmp_path)[-1])


@needs_fmnist
def test_resume_is_bit_exact(tmp_path):
    full = train.run(smoke_config(), tmp_path / "full")
    train.run(smoke_config("training.total_steps=3"), tmp_path / "split")
    resumed = train.run(smoke_config(), tmp_path / "split")  # resume=auto picks step 3
    assert [r["loss"] for r in records(tmp_path / "split")] == [r["loss"] for r in records(tmp_path / "full")]
    for a, b in ((full["model"], resumed["model"]), (full["ema"], resumed["ema"])):
        for (k, va), vb in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(va, vb), k


@pytest.mark.slow  # ~40 s: torch.compile of the model on CPU
@needs_fmnist
def test_compiled_training_matches_eager_and_resumes_without_compile(tmp_path):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    compiled = train.run(smoke_config("training.total_steps=3", "training.compile=true"), tmp_path / "compiled")
    assert counters["stats"]["unique_graphs"] > 0  # the forward really went through torch.compile
    eager = train.run(smoke_config("training.total_steps=3"), tmp_path / "eager")
    np.testing.assert_allclose(
        [r["loss"] for r in records(tmp_path / "compiled")], [r["loss"] for r in records(tmp_path / "eager")], rtol=1e-4
    )
    for k, v in eager["model"].state_dict().items():
        torch.testing.assert_close(compiled["model"].state_dict()[k], v, rtol=1e-4, atol=1e-5, msg=k)
    load_model(tmp_path / "compiled" / "model", use_ema=False)  # plain DiT names in the export and checkpoints
    resumed = train.run(smoke_config(), tmp_path / "compiled")  # resume=auto without compile
    assert resumed["step"] == 6
    torch._dynamo.reset()


@needs_fmnist
def test_crash_while_checkpointing_keeps_the_previous_one(tmp_path, monkeypatch):
    import dit.training.checkpointing as ckpt

    calls = {"n": 0}
    real = ckpt.save_file

    def crash_on_second(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", crash_on_second)
    with pytest.raises(OSError, match="simulated"):
        train.run(smoke_config(), tmp_path)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003"]
    assert not (tmp_path / "checkpoints" / ".step_0000006.tmp").exists()  # the failed save cleans up after itself
    load_model(tmp_path / "checkpoints" / "step_0000003")
    monkeypatch.setattr(ckpt, "save_file", real)
    result = train.run(smoke_config(), tmp_path)  # resume=auto continues from step 3
    assert result["step"] == 6 and [p.name for p in list_checkpoints(tmp_path)] == ["step_0000003", "step_0000006"]
    assert [r["step"] for r in records(tmp_path)] == [1, 2, 3, 4, 5, 6]


CPU_RANKS = {"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}  # several CPU processes (gloo), ENVIRONMENT.md
HELPER = str(ROOT / "tests" / "helpers" / "train_ranks.py")
SHORT = [*SMOKE, "training.total_steps=3", "training.ckpt_every=0"]


def accelerate_launch(config: str, *args: str) -> list[str]:
    """`accelerate launch --config_file configs/accelerate/<config>.yaml <args>` as a command line."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs" / "accelerate" / f"{config}.yaml"),
        *args,
    ]


def run_all(*commands: list[str]) -> None:
    """Start the commands together (the processes of one job) and check every one succeeded."""
    procs = [
        subprocess.Popen(c, env={**os.environ, **CPU_RANKS}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for c in commands
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-4000:]


def assert_ranks_match_one_process(run_dir: Path, one_dir: Path) -> None:
    """The ranks of a 3-step SHORT run hold identical weights, equal to a 1-process run's within float error."""
    rank0 = load_file(run_dir / "params_rank0.safetensors")
    rank1 = load_file(run_dir / "params_rank1.safetensors")
    one = train.run(smoke_config("training.total_steps=3", "training.ckpt_every=0"), one_dir)["model"].state_dict()
    for k in one:
        assert torch.equal(rank0[k], rank1[k]), f"{k} differs between ranks"
        torch.testing.assert_close(rank0[k], one[k], rtol=1e-5, atol=1e-6, msg=k)
    assert [r["step"] for r in records(run_dir)] == [1, 2, 3]
    # Training moved the weights (the comparison above is not between two untouched inits).
    init = train.build(smoke_config().model).state_dict()
    assert not torch.equal(one["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"])


@needs_fmnist
# accelerate launch: the same gloo processes as torchrun (~18 s): slow tier; torchrun stays in make test
@pytest.mark.parametrize("launcher", ["torchrun", pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, launcher):
    if launcher == "torchrun":
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29531"]
    else:  # the shipped DDP config
        cmd = accelerate_launch("ddp", "--num_processes", "2", "--main_process_port", "29532")
    run_all([*cmd, HELPER, str(tmp_path / "two"), *SHORT])
    assert_ranks_match_one_process(tmp_path / "two", tmp_path / "one")
    # The process count may change on resume: 2 processes for steps 1-3, then 1 for 4-6, as one run.
    train.run(smoke_config(), tmp_path / "two")
    train.run(smoke_config(), tmp_path / "full")
    np.testing.assert_allclose(
        [r["loss"] for r in records(tmp_path / "two")], [r["loss"] for r in records(tmp_path / "full")], rtol=1e-5
    )


@pytest.mark.slow  # ~15 s each: two "nodes" of one process each; two processes on one node stay in make test
@needs_fmnist
@pytest.mark.parametrize("launcher", ["accelerate", "torchrun"])
def test_two_nodes_on_localhost_match_one_process(tmp_path, launcher):
    """The README's two-node commands, with two 'nodes' of one process each on this machine."""
    port = "29561" if launcher == "accelerate" else "29562"
    nodes = []
    for node in ("0", "1"):
        if launcher == "accelerate":
            cmd = accelerate_launch(
                "multinode",
                "--num_processes",
                "2",
                "--machine_rank",
                node,
                "--main_process_ip",
                "127.0.0.1",
                "--main_process_port",
                port,
            )
        else:
            cmd = [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                node,
                "--master_addr",
                "127.0.0.1",
                "--master_port",
                port,
            ]
        nodes.append([*cmd, HELPER, str(tmp_path / "two"), *SHORT])
    run_all(*nodes)
    launched = [json.loads((tmp_path / "two" / f"launch_rank{r}.json").read_text()) for r in (0, 1)]
    assert [(x["RANK"], x["LOCAL_RANK"], x["GROUP_RANK"], x["WORLD_SIZE"]) for x in launched] == [
        ("0", "0", "0", "2"),
        ("1", "0", "1", "2"),
    ]
    assert_ranks_match_one_process(tmp_path / "two", tmp_path / "one")


@pytest.mark.slow  # ~27 s: two gloo processes under FSDP2, then a resume
@needs_fmnist
def test_fsdp2_matches_one_process_and_resumes(tmp_path):
    """The shipped FSDP config through Accelerate's FSDP2 path (fully_shard on a CPU mesh, see
    tests/helpers/cpu_fsdp.py): sharded parameters and EMA, clipping and accumulation, a checkpoint and a
    resume in a second launch; losses, weights and EMA match one unsharded process."""
    overrides = [
        *SMOKE,
        "training.ckpt_every=3",
        "training.grad_accum=2",
        "training.max_grad_norm=0.05",
        "training.ema_decay=0.5",
    ]
    run = tmp_path / "fsdp"
    fsdp = accelerate_launch(
        "fsdp", "--num_processes", "2", "--main_process_port", "29541", HELPER, "--fsdp-on-cpu", str(run)
    )
    run_all([*fsdp, *overrides, "training.total_steps=3"])
    ckpt = run / "checkpoints" / "step_0000003"
    assert (ckpt / "pytorch_model_fsdp.bin").exists() and (ckpt / "optimizer.bin").exists()
    run_all([*fsdp, *overrides])  # resume=auto from step 3
    one = train.run(smoke_config(*overrides[len(SMOKE) :]), tmp_path / "one")

    # Every block was really sharded: each rank holds half of each weight matrix.
    for rank in (0, 1):
        qkv_full, qkv_local = json.loads((run / f"shards_rank{rank}.json").read_text())["blocks.0.attn.qkv.weight"]
        assert qkv_local * 2 == qkv_full
    assert [r["step"] for r in records(run)] == [1, 2, 3, 4, 5, 6]
    np.testing.assert_allclose(
        [r["loss"] for r in records(run)], [r["loss"] for r in records(tmp_path / "one")], rtol=1e-5
    )
    assert all(r["grad_norm"] > 0.05 for r in records(run))  # clipping was active in every step
    np.testing.assert_allclose(
        [r["grad_norm"] for r in records(run)], [r["grad_norm"] for r in records(tmp_path / "one")], rtol=1e-4
    )
    init = train.build(smoke_config().model).state_dict()
    assert not torch.equal(
        one["ema"].state_dict()["blocks.0.attn.qkv.weight"], init["blocks.0.attn.qkv.weight"]
    )  # EMA moved
    for name, reference in (("model.safetensors", one["model"]), ("ema.safetensors", one["ema"])):
        exported = load_file(run / "model" / name)
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(exported[k], v, rtol=1e-5, atol=1e-6, msg=f"{name}: {k}")
    # sample.py loads an FSDP checkpoint: EMA weights, or the raw ones from Accelerate's file.
    for use_ema, reference in ((True, one["ema"]), (False, one["model"])):
        model, _ = load_model(run / "checkpoints" / "step_0000006", use_ema=use_ema)
        for k, v in reference.state_dict().items():
            torch.testing.assert_close(model.state_dict()[k], v, rtol=1e-5, atol=1e-6, msg=f"use_ema={use_ema}: {k}")


def test_global_batch_sampler_shards_and_resumes():
    def batches(world, rank, batch_size, accum=1, n=12):
        it = iter(GlobalBatchSampler(40, batch_size, world, rank, accum, seed=1))
        return [next(it) for _ in range(n)]

    one = batches(1, 0, 4)  # global batch 4 on one process
    r0, r1 = batches(2, 0, 2), batches(2, 1, 2)  # the same global batch on two
    assert [a + b for a, b in zip(r0, r1)] == one  # rank slices concatenate to the same global batches
    assert all(set(a).isdisjoint(b) for a, b in zip(r0, r1))
    accum = batches(1, 0, 2, accum=2, n=24)  # two micro-batches per global batch
    assert [a + b for a, b in zip(accum[::2], accum[1::2])] == one
    # One epoch = 10 global batches of 4 covering all 40 samples; the next epoch is a new permutation.
    assert sorted(i for b in one[:10] for i in b) == list(range(40)) and one[10:12] != one[0:2]
    # Resuming at (epoch 0, batch 5) continues exactly where an uninterrupted iterator is.
    s = GlobalBatchSampler(40, 4, 1, 0, 1, seed=1)
    s.set_position(0, 5)
    it = iter(s)
    assert [next(it) for _ in range(7)] == one[5:12]


def test_lr_schedules():
    o = OptimConfig(lr=1.0, warmup_steps=10, decay="cosine", min_lr_ratio=0.1)
    assert lr_at(0, 110, o) == pytest.approx(0.1) and lr_at(9, 110, o) == pytest.approx(1.0)
    assert lr_at(60, 110, o) == pytest.approx(0.55) and lr_at(110, 110, o) == pytest.approx(0.1)
    assert lr_at(60, 110, OptimConfig(lr=1.0, warmup_steps=10, decay="linear")) == pytest.approx(0.5)
    assert lr_at(5000, 10, OptimConfig(lr=3e-4)) == 3e-4


def test_ema_update_formula_and_frozen_buffers():
    model = tiny_dit(in_channels=1, num_classes=3)
    ema = EMA(model, decay=0.9)
    before = {k: v.clone() for k, v in ema.model.state_dict().items()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model)
    for name, p in ema.model.named_parameters():
        torch.testing.assert_close(p, 0.9 * before[name] + 0.1 * dict(model.named_parameters())[name])
    assert torch.equal(ema.model.pos_embed, before["pos_embed"])
    assert all(p.dtype == torch.float32 and not p.requires_grad for p in ema.model.parameters())
    warm = EMA(model, decay=0.9999, warmup=True)
    assert warm.current_decay() == pytest.approx(0.1)


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (ROOT / "configs" / "experiment").glob("*.yaml")))
def test_every_experiment_composes(experiment):
    cfg = compose_config("train", [f"experiment={experiment}"], return_hydra_config=True)
    assert cfg.model._target_ == "dit.models.DiT" and cfg.training.total_steps > 0


def test_cfg_job_prints_the_composed_config():
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--cfg", "job", "model=dit_b2", "model.block=cross_attn"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0 and "block: cross_attn" in proc.stdout and "hidden_size: 768" in proc.stdout


# --- your own data ------------------------------------------------------------------------------


def test_image_folder_training_and_class_names(tmp_path):
    root = image_folder(tmp_path / "data")
    cfg = smoke_config(
        "data=imagefolder",
        f"data.dataset.root={root}",
        "data.dataset.image_size=16",
        "data.limit=null",
        "training.global_batch_size=4",
        "training.total_steps=2",
    )
    train.run(cfg, tmp_path / "run")
    model, meta = load_model(tmp_path / "run" / "model")
    assert meta["class_names"] == ["cats", "dogs"] and model.num_classes == 2 and model.in_channels == 3


def test_latent_extraction_and_training(tmp_path):
    from dit.data.extract import main as extract

    vae = tiny_vae()
    vae.save_pretrained(tmp_path / "vae")
    root = image_folder(tmp_path / "data", size=16)
    extract(
        [
            "--root",
            str(root),
            "--image-size",
            "16",
            "--vae",
            str(tmp_path / "vae"),
            "--out",
            str(tmp_path / "lat"),
            "--batch-size",
            "5",
            "--shard-size",
            "4",
        ]
    )
    meta = json.loads((tmp_path / "lat" / "meta.json").read_text())
    assert meta["count"] == 12 and meta["num_classes"] == 2 and len(list((tmp_path / "lat").glob("shard_*"))) == 3
    with pytest.raises(SystemExit, match="already holds latents"):
        extract(
            ["--root", str(root), "--image-size", "16", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "lat")]
        )
    from dit.data import LatentShards

    ds = LatentShards(tmp_path / "lat")
    x, y = ds[11]
    assert x.shape == (2, 2, 4, 8, 8) and ds.input_size == 8 and ds.channels == 4
    cfg = smoke_config(
        "data=latents",
        f"data.dataset.root={tmp_path / 'lat'}",
        "data.limit=null",
        "model=dit_debug2",
        "training.global_batch_size=4",
        "training.total_steps=2",
        "training.sample_every=0",
    )
    train.run(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "samples" / "latest.png").exists()  # decoded through the VAE: 16x16 RGB
    assert Image.open(tmp_path / "run" / "samples" / "latest.png").size == (2 * 18 + 2, 2 * 18 + 2)


@needs_fmnist
def test_wandb_offline(tmp_path):
    train.run(smoke_config("logger=wandb", "logger.wandb.mode=offline", "training.total_steps=2"), tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


# --- bad input ----------------------------------------------------------------------------------


def test_missing_dataset_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"dataset folder not found: {tmp_path / 'nope'}"):
        train.run(smoke_config("data=imagefolder", f"data.dataset.root={tmp_path / 'nope'}"), tmp_path / "run")
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="no images"):
        train.run(smoke_config("data=imagefolder", f"data.dataset.root={tmp_path / 'empty'}"), tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="Fashion-MNIST file not found"):
        train.run(smoke_config(f"data.dataset.root={tmp_path}"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_corrupt_image_named_or_skipped(tmp_path):
    root = image_folder(tmp_path / "data")
    (root / "dogs" / "broken.png").write_bytes(b"\x89PNG not really")
    common = [
        "data=imagefolder",
        f"data.dataset.root={root}",
        "data.dataset.image_size=16",
        "data.limit=null",
        "training.global_batch_size=4",
        "training.total_steps=1",
    ]
    with pytest.raises(
        ValueError,
        match=r"(?s)1 unreadable image\(s\).*data.dataset.skip_corrupt=true.*dogs/broken.png: UnidentifiedImageError",
    ):
        train.run(smoke_config(*common), tmp_path / "run")
    with pytest.warns(UserWarning, match="skipped 1 unreadable image"):
        train.run(smoke_config(*common, "data.dataset.skip_corrupt=true"), tmp_path / "run")


@needs_fmnist
def test_batch_size_not_divisible_leaves_checkpoints_alone(tmp_path):
    train.run(smoke_config("training.total_steps=3"), tmp_path)
    before = {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError, match=r"global_batch_size=15 is not divisible by processes \(1\) x grad_accum \(2\)"
    ):
        train.run(smoke_config("training.global_batch_size=15", "training.grad_accum=2"), tmp_path)
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoints").rglob("*") if p.is_file()} == before


def test_labels_outside_the_class_range(tmp_path):
    root = image_folder(tmp_path / "data", classes=("a", "b", "c"))
    with pytest.raises(ValueError, match="data.num_classes=2 but the dataset"):
        train.run(smoke_config("data=imagefolder", f"data.dataset.root={root}", "data.num_classes=2"), tmp_path / "run")


class NaNAfter(torch.utils.data.Dataset):
    """Wraps a dataset; images from index `start` on are NaN."""

    def __init__(self, dataset, start):
        self.dataset, self.start = dataset, start

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        x, y = self.dataset[i]
        return (x * float("nan") if i >= self.start else x), y

    def __getattr__(self, name):
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)


@needs_fmnist
@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nan_loss(tmp_path, monkeypatch, policy):
    real = train.build_data
    monkeypatch.setattr(train, "build_data", lambda cfg: NaNAfter(real(cfg), start=200))
    cfg = smoke_config(f"training.nan_policy={policy}", "training.total_steps=20", "training.ckpt_every=0")
    if policy == "stop":
        with pytest.raises(FloatingPointError, match=r"non-finite loss at step \d+"):
            train.run(cfg, tmp_path)
        assert not list_checkpoints(tmp_path)  # no checkpoint of a broken run
    else:
        result = train.run(cfg, tmp_path)
        assert records(tmp_path)[-1]["skipped_steps"] > 0
        assert all(torch.isfinite(p).all() for p in result["model"].parameters())


@needs_fmnist
def test_detect_anomaly_is_a_runtime_option(tmp_path, monkeypatch):
    """training.detect_anomaly runs the training steps in torch.autograd's anomaly mode (and only them: the FLOPs
    are counted on the meta device, where it cannot run); how a run computes, not what: the digest leaves it out."""
    seen, real = [], train.build_job

    def recording(cfg, run_dir):
        job = real(cfg, run_dir)
        losses = job.objective.losses
        job.objective.losses = lambda *a, **k: seen.append(torch.is_anomaly_enabled()) or losses(*a, **k)
        return job

    monkeypatch.setattr(train, "build_job", recording)
    for on in (True, False):
        train.run(smoke_config(f"training.detect_anomaly={on}", "training.total_steps=2"), tmp_path / str(on))
        assert seen and set(seen) == {on}
        seen.clear()
    finished = [json.loads((tmp_path / str(on) / "finished.json").read_text())["settings"] for on in (True, False)]
    assert finished[0] == finished[1]


def test_cli_bad_input_exits_nonzero(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "experiment=smoke",
            "data=imagefolder",
            f"data.dataset.root={tmp_path / 'missing'}",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode != 0 and f"dataset folder not found: {tmp_path / 'missing'}" in proc.stderr


@needs_fmnist
def test_fid_during_training(tmp_path):
    cfg = smoke_config(
        "training.fid_every=2",
        "training.fid_samples=20",
        "training.fid_sampling.steps=2",
        "training.total_steps=4",
        "training.fid_metric=fashion_mnist",
        "training.fid_ref=fashion_mnist:test",
    )
    with pytest.warns(UserWarning, match="unreliable"):  # 20 samples < 128 dims
        train.run(cfg, tmp_path / "run")
    evals = [r for r in records(tmp_path / "run") if "fid" in r]
    assert [r["step"] for r in evals] == [2, 4] and all(
        r["fid"] > 0 and 0 <= r["class_consistency"] <= 1 for r in evals
    )
    from dit.eval.domain import EXTRACTOR

    assert all(
        r["fid_extractor"] == EXTRACTOR for r in evals
    )  # each record names what measured it: the shipped classifier
    assert (tmp_path / "run" / "fid.png").exists() and (tmp_path / "run" / "fid_ref_fashion_mnist.npz").exists()


@needs_fmnist
def test_final_fid_on_more_samples_and_a_finished_run_left_alone(tmp_path):
    """fid_final_samples: the last step is evaluated on more samples (and, for the curve, on fid_samples of
    them), also when total_steps is not a multiple of fid_every; running a finished run again changes nothing."""
    cfg = smoke_config(
        "training.fid_every=2",
        "training.fid_samples=20",
        "training.fid_final_samples=30",
        "training.fid_sampling.steps=2",
        "training.total_steps=5",
        "training.fid_metric=fashion_mnist",
        "training.fid_ref=fashion_mnist:test",
    )
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="unreliable"):
        train.run(cfg, run)
    evals = [r for r in records(run) if "fid" in r]
    assert [(r["step"], r["fid_n"]) for r in evals] == [(2, 20), (4, 20), (5, 20), (5, 30)]
    assert all(0 <= r["class_consistency_min"] <= r["class_consistency"] <= 1 for r in evals)
    for r in evals:  # per class (labels arange(n) % 10: equal counts, so the overall share is their mean)
        per_class = r["class_consistency_per_class"]
        assert len(per_class) == 10 and min(per_class) == r["class_consistency_min"]
        assert sum(per_class) / 10 == pytest.approx(r["class_consistency"], abs=1e-12)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from dit.training.logging import TRACKING_DIR

    events = EventAccumulator(str(run / TRACKING_DIR / "dit"))
    events.Reload()
    tags = events.Tags()["scalars"]  # the trackers: the curve, the final figures apart, scalars only
    assert {"fid", "class_consistency_min", "final/fid", "final/class_consistency_min"} <= set(tags)
    assert not [tag for tag in tags if "per_class" in tag]
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    out = train.run(cfg, run)
    assert out["step"] == 5 and {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before


@needs_fmnist
def test_a_finished_run_kept_without_its_weights_is_not_trained_again(tmp_path, capsys, monkeypatch):
    """A study committed to git keeps metrics.jsonl and finished.json, not checkpoints/ or model/ (.gitignore):
    running it again (resume=auto) leaves such a run alone and dit.analysis.report counts it as finished. Other
    settings, a longer budget, resume=null or a damaged record train it again; a finished run that predates
    the record gets one."""
    import shutil

    from omegaconf import OmegaConf

    from dit.analysis.runs import class_names, load_run

    def fresh_clone():
        shutil.rmtree(run / "checkpoints"), shutil.rmtree(run / "model")

    def trained(result):
        return result["checkpoint"] is not None

    run, cfg = tmp_path / "job", smoke_config()
    train.run(cfg, run)
    (run / ".hydra").mkdir()
    (run / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))  # what Hydra writes beside it
    info = json.loads((run / "finished.json").read_text())
    assert info["step"] == 6 and info["class_names"][:2] == ["T-shirt/top", "Trouser"] and len(info["settings"]) == 64
    fresh_clone()
    metrics = (run / "metrics.jsonl").read_bytes()
    capsys.readouterr()
    assert train.run(smoke_config("training.num_workers=1"), run) == {
        "step": 6,
        "checkpoint": None,
        "export": None,
    }  # runtime key
    message = (
        f"already finished at step 6 (results in metrics.jsonl; no checkpoint here); delete {run / 'finished.json'}"
    )
    assert message in capsys.readouterr().err  # a diagnostic: stderr (stdout carries results only)
    assert (run / "metrics.jsonl").read_bytes() == metrics and not (run / "checkpoints").exists()
    found = load_run(run)
    assert found["status"] == "ok" and class_names(found) == info["class_names"]

    (run / "finished.json").write_text("{")  # damaged: warned about, not finished, so trained again
    with pytest.warns(UserWarning, match="finished.json: unreadable"):
        assert load_run(run)["status"] == "unfinished: stopped at step 6 of 6"
    with pytest.warns(UserWarning, match="finished.json: unreadable"):
        assert trained(train.run(smoke_config(), run))
    assert json.loads((run / "finished.json").read_text()) == info

    (run / "finished.json").unlink()  # finished (checkpoints there) before the record existed: it is written
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
    assert train.run(smoke_config(), run)["step"] == 6 and json.loads((run / "finished.json").read_text()) == info
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file() and p.name != "finished.json"} == before

    fresh_clone()
    assert trained(train.run(smoke_config("optim.lr=3e-4"), run))  # other settings, same budget: trained again
    assert json.loads((run / "finished.json").read_text())["settings"] != info["settings"]
    fresh_clone()
    assert trained(train.run(smoke_config("optim.lr=3e-4", "resume=null"), run))  # resume=null: start afresh, always
    fresh_clone()
    longer = train.run(
        smoke_config("training.total_steps=8"), run
    )  # another budget: the record of 6 steps does not hold
    assert trained(longer) and longer["step"] == 8 and json.loads((run / "finished.json").read_text())["step"] == 8
    assert [r["step"] for r in records(run)][-1] == 8

    fresh_clone()  # trained again and stopped half-way: the old record is gone, the run is not finished
    import dit.training.loop as loop

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(loop, "save_checkpoint", disk_full)
    with pytest.raises(OSError, match="disk full"):
        train.run(smoke_config("training.total_steps=8", "optim.lr=2e-4", "training.ckpt_every=3"), run)
    assert not (run / "finished.json").exists()


@pytest.mark.slow  # ~27 s: a multirun that fails, then succeeds
@needs_fmnist
def test_a_failed_run_notes_why_and_a_later_success_clears_it(tmp_path):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "train.py", *SMOKE, "logger=none", f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    bad = subprocess.run(
        [*cmd, "training.grad_accum=3"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )  # 16 images a step are not divisible into 3 micro-batches: a ValueError once the run has started
    assert bad.returncode != 0
    note = (run_dir / "error.txt").read_text()
    assert note.startswith("ValueError: ") and note.count("\n") == 1 and note.strip().split(": ", 1)[1] in bad.stderr
    fewer = subprocess.run(
        [*cmd, "training.fid_samples=100", "training.fid_final_samples=50"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert fewer.returncode != 0 and "training.fid_final_samples=50 < training.fid_samples=100" in fewer.stderr
    good = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert good.returncode == 0, good.stderr
    assert not (run_dir / "error.txt").exists() and (run_dir / "model" / "config.json").exists()
