"""Fault injection: every loader turns a damaged file into one line naming it; checkpoints survive a
full disk and a SIGKILL mid-save; resume=auto steps back over a damaged checkpoint.

Damage: truncation at several offsets, random bytes of the same size, an empty file, a missing file.
"""

import errno
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import FMNIST, ROOT, SMOKE, needs_fmnist, smoke_config
from helpers.tiny import randomize, tiny_diffusers_dit, tiny_dit
from safetensors.torch import save_file

import train
from dit.atomic import WriteFailed, append_line, atomic_dir, atomic_file, remove_stale_temporaries, writing
from dit.data.latents import LatentShards
from dit.eval.stats import ImageSource, Stats, is_stats_file
from dit.hub import ModelRecord, load_model, save_export
from dit.integrity import DamagedFileError
from dit.training.checkpointing import _prune, checkpoint_bytes, checkpoint_problem, find_resume, list_checkpoints

# A checkpoint every step (more moments to kill), the last two kept.
RUN = [*SMOKE, "training.ckpt_every=1", "training.keep_last=2"]


def cfg_for(*overrides):
    return smoke_config(*RUN[len(SMOKE) :], *overrides)


# --- damage ----------------------------------------------------------------------------------------

DAMAGE = ["empty", "cut_7", "cut_half", "cut_last_byte", "random"]


def damage(path: Path, how: str) -> None:
    """Damage a file in place: truncate it (to 0 bytes, 7 bytes, half, all but the last byte), or overwrite
    it with random bytes of the same size; "missing" removes it."""
    data = path.read_bytes()
    if how == "missing":
        path.unlink()
        return
    rng = np.random.default_rng(len(data))
    damaged = {
        "empty": b"",
        "cut_7": data[:7],
        "cut_half": data[: len(data) // 2],
        "cut_last_byte": data[:-1],
        "random": rng.integers(0, 256, len(data), dtype=np.uint8).tobytes(),
    }[how]
    path.write_bytes(damaged)


def snapshot(root: Path) -> dict:
    """Every file under root with its size and modification time (to check that nothing else was touched)."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def assert_names(error: BaseException, path: Path) -> None:
    """One line, naming the file."""
    message = str(error)
    assert str(path) in message and "\n" not in message, message


# --- a trained run, shared --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step smoke run with a checkpoint every step (steps 5 and 6 kept) and its final weights."""
    if not FMNIST.exists():
        pytest.skip("dataset-fashion-mnist not installed (make setup)")
    run = tmp_path_factory.mktemp("trained")
    result = train.run(cfg_for(), run)
    weights = {k: v.clone() for k, v in result["model"].state_dict().items()}
    return run, weights


def copy_run(trained, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained[0], run)
    return run


def assert_same_weights(model: torch.nn.Module, weights: dict) -> None:
    for k, v in model.state_dict().items():
        assert torch.equal(v, weights[k]), k


# --- our exports and checkpoints ---------------------------------------------------------------------


@pytest.mark.parametrize("how", [*DAMAGE, "missing"])
@pytest.mark.parametrize("name", ["config.json", "ema.safetensors", "model.safetensors"])
def test_damaged_export(trained, tmp_path, name, how):
    export = tmp_path / "model"
    shutil.copytree(trained[0] / "model", export)
    damage(export / name, how)
    before = snapshot(export)
    use_ema = name != "model.safetensors"
    if how == "missing" and name == "ema.safetensors":  # the EMA is optional: the raw weights load instead
        assert load_model(export)[1]["weights"] == str(export / "model.safetensors")
        return
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        load_model(export, use_ema=use_ema)
    assert_names(e.value, export / name)
    assert snapshot(export) == before


def test_a_wrapped_models_checkpoint_loads_the_dit_under_its_prefix(tmp_path):
    """A training add-on that wraps the DiT (its own head beside it) saves the DiT's weights under a prefix: they
    load, the add-on's are left out; a key under the prefix that does not fit the DiT still fails, named."""
    model = randomize(tiny_dit(in_channels=1), seed=0)
    path = save_export(tmp_path / "checkpoint", model, ModelRecord(data=dict(latent=False)))
    wrapped = {f"module.dit.{k}": v for k, v in model.state_dict().items()} | {"module.head.weight": torch.ones(3)}
    save_file(wrapped, path / "model.safetensors")
    loaded = load_model(path, use_ema=False)[0].state_dict()
    assert loaded.keys() == model.state_dict().keys()
    assert all(torch.equal(v, loaded[k]) for k, v in model.state_dict().items())
    save_file(wrapped | {"module.dit.blocks.0.extra": torch.ones(1)}, path / "model.safetensors")
    with pytest.raises(ValueError, match="unexpected keys: blocks.0.extra"):
        load_model(path, use_ema=False)


@pytest.mark.parametrize("how", DAMAGE)
def test_damaged_official_pt(tmp_path, how):
    path = tmp_path / "DiT-XL-2-256x256.pt"
    torch.save({"x_embedder.proj.weight": torch.randn(8, 4, 2, 2), "pos_embed": torch.randn(1, 4, 8)}, path)
    damage(path, how)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert_names(e.value, path)


@pytest.fixture(scope="module")
def diffusers_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("diffusers") / "transformer"
    tiny_diffusers_dit(num_embeds_ada_norm=1000, norm_eps=1e-5).save_pretrained(path)
    return path


@pytest.mark.parametrize(
    "how", ["empty", "cut_7", "cut_half", "random"]
)  # not cut_last_byte: config.json ends in a newline
@pytest.mark.parametrize("name", ["config.json", "diffusion_pytorch_model.safetensors"])
def test_damaged_diffusers_dir(diffusers_dir, tmp_path, name, how):
    path = tmp_path / "transformer"
    shutil.copytree(diffusers_dir, path)
    damage(path / name, how)
    with pytest.raises(ValueError) as e:
        load_model(path)
    assert_names(e.value, path / name)


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,how",
    [
        ("trainer_state.json", "empty"),
        ("trainer_state.json", "cut_half"),
        ("config.json", "random"),
        ("ema.safetensors", "cut_last_byte"),
        ("model.safetensors", "cut_7"),
        ("optimizer.bin", "cut_half"),
        ("optimizer.bin", "random"),
        ("random_states_0.pkl", "empty"),
        ("optimizer.bin", "missing"),
        ("ema.safetensors", "missing"),
    ],
)
def test_resume_auto_skips_a_damaged_checkpoint(trained, tmp_path, name, how):
    run = copy_run(trained, tmp_path)
    latest = run / "checkpoints" / "step_0000006"
    damage(latest / name, how)
    before = snapshot(run)
    with pytest.warns(UserWarning, match=f"skipping damaged checkpoint.*{re.escape(str(latest / name))}") as caught:
        assert find_resume("auto", run) == run / "checkpoints" / "step_0000005"
    assert len(caught) == 1 and "\n" not in str(caught[0].message)
    with pytest.raises(ValueError) as e:  # named explicitly, it is an error
        find_resume(str(latest), run)
    assert_names(e.value, latest / name)
    assert snapshot(run) == before  # nothing deleted or rewritten


def test_every_checkpoint_damaged_is_an_error(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    for ckpt in list_checkpoints(run):
        damage(ckpt / "ema.safetensors", "cut_half")
    with pytest.raises(ValueError, match="every one is damaged"):
        find_resume("auto", run)


def test_pruning_never_counts_a_damaged_checkpoint(trained, tmp_path):
    """keep_last=1 after saving step 6 with a damaged step 9 beside it: step 5 goes, 6 and the damaged 9 stay."""
    run = copy_run(trained, tmp_path)
    root = run / "checkpoints"
    shutil.copytree(root / "step_0000006", root / "step_0000009")
    damage(root / "step_0000009" / "optimizer.bin", "cut_half")
    _prune(run, keep_last=1, saved=root / "step_0000006")
    assert [p.name for p in list_checkpoints(run)] == ["step_0000006", "step_0000009"]


@needs_fmnist
def test_resume_after_a_damaged_checkpoint_gives_the_same_weights(trained, tmp_path):
    run = copy_run(trained, tmp_path)
    damage(run / "checkpoints" / "step_0000006" / "model.safetensors", "cut_half")
    with pytest.warns(UserWarning, match="skipping damaged checkpoint"):
        result = train.run(cfg_for(), run)  # resume=auto: from step 5, not the damaged step 6
    assert_same_weights(result["model"], trained[1])
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(run))  # step 6 saved again, whole


@needs_fmnist
def test_disk_full_during_a_checkpoint(tmp_path, monkeypatch):
    """torch.save (optimizer.bin) hits ENOSPC half-way through the second save: a clear error, step 1 intact,
    no half directory under a real name and no temporary directory left behind."""
    real, calls = torch.save, {"n": 0}

    def save_then_disk_full(obj, f, *args, **kwargs):
        calls["n"] += str(f).endswith("optimizer.bin")
        if calls["n"] == 2:  # the second checkpoint's optimizer.bin
            Path(f).write_bytes(b"PK\x03\x04partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_then_disk_full)
    with pytest.raises(WriteFailed, match="^no space left on device: cannot write .*step_0000002 .*untouched$") as e:
        train.run(cfg_for("training.total_steps=3"), tmp_path)
    assert e.value.errno == errno.ENOSPC and "\n" not in str(e.value)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_0000001"]
    assert checkpoint_problem(tmp_path / "checkpoints" / "step_0000001") is None
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0000001"]


# --- a full disk, for real: a small tmpfs ------------------------------------------------------------


@contextmanager
def small_filesystem(path: Path, size: str):
    """A real filesystem of `size` (mount's syntax: 5m) at path: a tmpfs, which needs root's mount rights. Where it
    cannot be mounted the test is skipped: test_a_write_past_the_file_size_limit_is_one_line is the portable one."""
    path.mkdir(parents=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if done.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode().strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def grow(path: Path, size: str) -> None:
    """Free space on the small filesystem (what a user does after the failure)."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


@needs_fmnist
def test_a_full_disk_ends_train_in_one_line_and_resume_is_exact(trained, tmp_path, capsys):
    """train.py with its run directory on a 5 MB filesystem (a checkpoint is 3 MB): the first checkpoint fits, the
    second does not. The run warns before it (training.low_disk=warn), then ends in one line naming the cause, the
    checkpoint and the free space, without a traceback; the first checkpoint is intact and no temporary is left.
    Once space is freed, resume=auto removes what a killed save would have left and ends with the weights of the
    uninterrupted run."""
    with small_filesystem(tmp_path / "disk", "5m") as disk:
        run = disk / "run"
        threads = str(torch.get_num_threads())  # the uninterrupted run's (matmul sums depend on it)
        args = [str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run}"]
        proc = run_cli(args, tmp_path, OMP_NUM_THREADS=threads)
        assert proc.returncode == 1, proc.stderr[-3000:]
        last = proc.stderr.strip().splitlines()[-1]
        second = run / "checkpoints" / "step_0000002"
        assert re.fullmatch(
            rf"error: no space left on device: cannot write {second} \(2\.9 MB needed, [\d.]+ [kM]?B free\); "
            "the earlier checkpoints are untouched",
            last,
        ), proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr
        assert f"low disk space: checkpoint {second} needs about 2.9 MB" in proc.stderr
        assert [p.name for p in list_checkpoints(run)] == ["step_0000001"]
        assert checkpoint_problem(run / "checkpoints" / "step_0000001") is None
        assert sorted(os.listdir(run / "checkpoints")) == ["step_0000001"]  # the failed save's temporary removed
        grow(disk, "64m")
        (run / "checkpoints" / ".step_0000004.tmp").mkdir()  # what a save killed mid-write leaves
        (run / ".metrics.jsonl.tmp-x1y2z3").write_text("")  # and a rewrite of the metrics
        capsys.readouterr()
        result = train.run(cfg_for(), run)  # resume=auto, here (this process's threads: the uninterrupted run's)
        assert "removed checkpoints/.step_0000004.tmp, left by an interrupted write" in capsys.readouterr().err
        assert [p.name for p in run.rglob(".*")] == [".hydra"]  # no temporary anywhere
        assert result["step"] == 6
        assert_same_weights(result["model"], trained[1])


@needs_fmnist
def test_low_disk_stop_ends_cleanly_before_writing(trained, tmp_path):
    """training.low_disk=stop: a checkpoint the free space cannot hold (less than the last one's size) is not
    started; one line says so with the sizes, the earlier checkpoints are kept, nothing half written is left."""
    from accelerate import Accelerator

    from dit.training.checkpointing import _check_space

    with small_filesystem(tmp_path / "disk", "4m") as disk:
        run = disk / "run"  # the trained run with its last checkpoint (3 MB) only: 1 MB free
        shutil.copytree(trained[0], run, ignore=lambda _, names: {"step_0000005", "model"} & set(names))
        final = run / "checkpoints" / "step_0000007"
        with pytest.raises(WriteFailed, match=rf"^no space left on device for checkpoint {final} \(2\.9 MB needed, "):
            _check_space(Accelerator(cpu=True), run, final, "stop")
        with pytest.warns(UserWarning, match="low disk space: checkpoint .*step_0000007 needs about 2.9 MB"):
            assert _check_space(Accelerator(cpu=True), run, final, "warn") == checkpoint_bytes(
                run / "checkpoints" / "step_0000006"
            )
        assert [p.name for p in list_checkpoints(run)] == ["step_0000006"] and not final.exists()


def test_writes_to_a_full_disk_are_one_line_and_leave_nothing_half_written(tmp_path):
    """Every writer on a full filesystem: atomic files and directories (samples, statistics, exports), safetensors
    (EMA weights), a log line (metrics.jsonl): WriteFailed naming the cause and the path; the old file, the old
    directory and the earlier lines are kept; no temporary is left."""
    with small_filesystem(tmp_path / "disk", "1m") as disk:
        log = disk / "metrics.jsonl"
        append_line(log, '{"step": 1}')
        atomic_file(disk / "a.npz", lambda tmp: np.savez(tmp, x=np.zeros(10)), suffix=".npz")
        big = np.random.default_rng(0).random(200_000)  # 1.6 MB
        with pytest.raises(WriteFailed, match=f"^no space left on device: cannot write {disk / 'a.npz'} "):
            atomic_file(disk / "a.npz", lambda tmp: np.savez(tmp, x=big), suffix=".npz")
        assert np.load(disk / "a.npz")["x"].shape == (10,)
        with pytest.raises(WriteFailed, match=f"^no space left on device: cannot write {disk / 'model'}"):
            with atomic_dir(disk / "model") as tmp:
                save_file({"w": torch.from_numpy(big)}, tmp / "ema.safetensors")
        with pytest.raises(WriteFailed, match=f"^no space left on device: cannot write {log} .*; kept$"):
            append_line(log, "x" * 2_000_000, kept="kept")
        assert log.read_text() == '{"step": 1}\n'
        assert sorted(os.listdir(disk)) == ["a.npz", "metrics.jsonl"]


def test_a_write_past_the_file_size_limit_is_one_line(tmp_path):
    """The portable fault (no mount needed): RLIMIT_FSIZE (ulimit -f) makes torch's zip writer fail with a message
    that names no cause ("unexpected pos ..."); writing() names it, with the limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    path = tmp_path / "optimizer.bin"
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, hard))
        with pytest.raises(
            WriteFailed, match=f"^file too large \\(the file-size limit, ulimit -f, is 195.3 kB\\): cannot write {path}"
        ):
            with writing(path):
                torch.save({"w": torch.zeros(100_000)}, path)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def test_stale_temporaries_are_removed_and_an_interrupted_replacement_is_undone(tmp_path):
    """What each writer's temporaries are named, removed; a directory whose replacement was cut between its two
    renames (only `.model.old-<pid>` left) is put back; other hidden files (.hydra) are not touched."""
    (tmp_path / "checkpoints" / ".step_0000009.tmp").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_0000006").mkdir()
    (tmp_path / ".model.tmp-abc123").mkdir()
    (tmp_path / ".model.old-4242").mkdir()
    (tmp_path / ".model.old-4242" / "config.json").write_text("{}")
    (tmp_path / ".metrics.jsonl.tmp-q1w2e3").write_text("")
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".grid.png.tmp-r4t5y6.png").write_text("")
    (tmp_path / ".hydra").mkdir()
    removed = remove_stale_temporaries(tmp_path)
    assert len(removed) == 5
    assert (tmp_path / "model" / "config.json").exists()  # the old copy, back under its name
    left = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    assert left == [".hydra", "checkpoints", "checkpoints/step_0000006", "model", "model/config.json", "samples"]


@needs_fmnist
def test_sigkill_during_a_checkpoint_write_then_resume(trained, tmp_path):
    """A real training process is killed while a checkpoint directory is half written; resume=auto ends
    with the weights of the uninterrupted run."""
    run = tmp_path / "run"
    root = run / "checkpoints"
    # the thread count of this process: the resumed steps run here, and matmul sums depend on it
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads()), "WANDB_MODE": "disabled"}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *RUN, f"hydra.run.dir={run}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    killed_in = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        # The moment: a save under way (a hidden tmp directory holding some files) after a complete one.
        try:
            names = os.listdir(root)
            tmp = [n for n in names if n.startswith(".step_") and n.endswith(".tmp")]
            if tmp and any(n.startswith("step_") for n in names) and os.listdir(root / tmp[0]):
                proc.send_signal(signal.SIGKILL)
                killed_in = tmp[0]
                break
        except FileNotFoundError:  # not created yet, or renamed between the two looks
            pass
        time.sleep(0.001)
    proc.wait(timeout=60)
    assert killed_in is not None, f"the run ended before a checkpoint write was seen: {proc.stderr.read()[-2000:]!r}"
    assert proc.returncode == -signal.SIGKILL
    assert (root / killed_in).exists()  # hidden and half written, never under a real name
    assert all(checkpoint_problem(p) is None for p in list_checkpoints(run))
    result = train.run(cfg_for(), run)  # resume=auto
    assert result["step"] == 6
    assert_same_weights(result["model"], trained[1])
    assert not list(root.glob(".step_*.tmp"))  # the killed save's leftovers are cleaned by the next save


# --- samples, statistics, latents, caches ----------------------------------------------------------


@pytest.mark.parametrize("how", [*DAMAGE, "missing"])
def test_damaged_npz_samples_and_statistics(tmp_path, how):
    samples, stats = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=np.zeros((4, 8, 8, 3), np.uint8), arr_1=np.arange(4))
    Stats(np.zeros(3), np.eye(3), 4, "test").save(stats)
    damage(samples, how)
    damage(stats, how)
    before = snapshot(tmp_path)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        ImageSource(str(samples))
    assert_names(e.value, samples)
    with pytest.raises((ValueError, FileNotFoundError)) as e:
        Stats.load(stats, "test")
    assert_names(e.value, stats)
    if how == "missing":
        assert not is_stats_file(str(stats))
    else:
        with pytest.raises(DamagedFileError) as e:
            is_stats_file(str(stats))
        assert_names(e.value, stats)
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("how", DAMAGE)
@pytest.mark.parametrize("name", ["meta.json", "shard_00000.safetensors"])
def test_damaged_latent_shards(tmp_path, name, how):
    n = 3
    save_file(
        {
            "mean": torch.zeros(n, 2, 4, 2, 2, dtype=torch.float16),
            "std": torch.ones(n, 2, 4, 2, 2, dtype=torch.float16),
            "labels": torch.arange(n),
        },
        tmp_path / "shard_00000.safetensors",
    )
    meta = {"count": n, "num_classes": 3, "image_size": 16, "vae": "x", "scaling_factor": 0.18215}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    assert len(LatentShards(str(tmp_path))) == n
    damage(tmp_path / name, how)
    with pytest.raises(ValueError) as e:
        LatentShards(str(tmp_path))
    assert_names(e.value, tmp_path / name)


def test_safetensors_header_check_says_what_is_wrong(tmp_path):
    """safe_open's verdict in our words: each damage named (bytes appended too), a whole file passes."""
    from dit.integrity import safetensors_problem

    path = tmp_path / "x.safetensors"
    save_file({"a": torch.zeros(4, 4), "b": torch.arange(3)}, path)
    data = path.read_bytes()
    assert safetensors_problem(path) is None
    for damaged, problem in (
        (b"", "empty file (0 bytes)"),
        (data[:7], "truncated (7 bytes, less than the 8-byte header length)"),
        (data[:20], "truncated or not a safetensors file (20 bytes, fewer than its header's length says)"),
        (data[:-1], f"truncated, or longer than its header describes ({len(data) - 1} bytes;"),
        (data + b"\0", f"truncated, or longer than its header describes ({len(data) + 1} bytes;"),
        (data[:8] + b"[" + data[9:], "not a safetensors file (unreadable header; safetensors:"),
    ):
        path.write_bytes(damaged)
        assert safetensors_problem(path).startswith(problem)


@pytest.mark.parametrize("how", ["empty", "cut_half", "cut_last_byte", "random", "one_byte_changed"])
def test_damaged_or_changed_shipped_domain_classifier_is_refused(tmp_path, monkeypatch, how):
    """The shipped classifier is checked against its SHA-256: any change (even one byte inside the tensors,
    which no header check sees) is refused with one line naming the file; nothing is retrained or rewritten."""
    import dit.eval.domain as domain

    copy = tmp_path / domain.WEIGHTS.name
    shutil.copyfile(domain.WEIGHTS, copy)
    monkeypatch.setattr(domain, "WEIGHTS", copy)
    domain.load_classifier()  # the copy is the shipped file: it loads
    if how == "one_byte_changed":
        data = bytearray(copy.read_bytes())
        data[-100] ^= 1  # inside fc2's weights: a valid safetensors file with other values
        copy.write_bytes(bytes(data))
    else:
        damage(copy, how)
    before = snapshot(tmp_path)
    with pytest.raises(DamagedFileError) as e:
        domain.load_classifier()
    assert_names(e.value, copy)
    assert f"expected {domain.WEIGHTS_SHA256}" in str(e.value) and snapshot(tmp_path) == before


@pytest.mark.parametrize("how", ["empty", "cut_half", "random"])
def test_damaged_explicit_domain_classifier_is_named(tmp_path, how):
    import dit.eval.domain as domain

    other = tmp_path / "mine.safetensors"
    domain.save_classifier(domain.FashionCNN(), 0.5, other)
    damage(other, how)
    with pytest.raises(DamagedFileError) as e:
        domain.load_classifier(other)
    assert_names(e.value, other)


# --- command lines: one line on stderr, exit code 1 --------------------------------------------------


def run_cli(args: list[str], cwd: Path, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "OMP_NUM_THREADS": "1", **env},
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_sample_cli_with_a_truncated_export(trained, tmp_path):
    export = tmp_path / "model"
    shutil.copytree(trained[0] / "model", export)
    damage(export / "ema.safetensors", "cut_half")
    before = snapshot(export)
    out = tmp_path / "samples"
    proc = run_cli([str(ROOT / "sample.py"), f"checkpoint={export}", f"out_dir={out}", "steps=2"], tmp_path)
    assert proc.returncode == 1, proc.stderr[-2000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {export / 'ema.safetensors'} is damaged: truncated"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert snapshot(export) == before and not (out / "grid.png").exists()


def test_eval_cli_with_a_truncated_npz(tmp_path):
    import dit.eval.domain as domain

    samples, stats = tmp_path / "samples.npz", tmp_path / "ref.npz"
    np.savez(samples, arr_0=np.zeros((4, 28, 28, 1), np.uint8), arr_1=np.arange(4))
    Stats(np.zeros(128), np.eye(128), 4, domain.EXTRACTOR).save(stats)
    damage(samples, "cut_half")
    before = snapshot(tmp_path)
    args = ["-m", "dit.eval", "fid", str(samples), str(stats), "--metric", "fashion_mnist", "--device", "cpu"]
    proc = run_cli(args, ROOT)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert (
        proc.stderr.strip().splitlines()[-1].startswith(f"error: {samples} is damaged: not a readable npz archive")
    ), proc.stderr
    assert "Traceback" not in proc.stderr and snapshot(tmp_path) == before
