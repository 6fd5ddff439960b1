"""Latent extraction (python -m dit.data.extract): the DataLoader path writes the bytes an image-by-image loop
writes, for one process and for each process's share of two (in-process; under torchrun in the slow tier); a
process killed at any point of finalize leaves the old latents or the new ones, and the next run clears what it
left."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers.tiny import tiny_vae
from PIL import Image
from safetensors.torch import save as safetensors_bytes

import dit.atomic
from dit.data import ImageFolder
from dit.data.extract import ShardWriter, batches, encode, finalize, share
from dit.data.extract import main as extract


def jpeg_folder(root: Path, per_class: int = 7, size: int = 12) -> Path:
    """Two classes of random JPEGs, not square (the centre crop has work to do)."""
    rng = np.random.default_rng(0)
    for c in ("cats", "dogs"):
        (root / c).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size + 6, 3), dtype=np.uint8)).save(root / c / f"{i}.jpg")
    return root


def reference_shards(dataset, vae, process: int, processes: int, batch_size: int, shard_size: int) -> dict:
    """{file name: bytes} of one process's shards, computed here image by image: every processes-th image from
    its index, batch_size at a time through the VAE (both flips), a shard every shard_size images or more."""
    mine = list(range(process, len(dataset), processes))
    shards, parts = {}, {"mean": [], "std": [], "labels": []}

    def flush():
        name = f"shard_{process:03d}_{len(shards):05d}.safetensors"
        shards[name] = safetensors_bytes({k: torch.cat(v).contiguous() for k, v in parts.items()})
        for v in parts.values():
            v.clear()

    with torch.no_grad():
        for start in range(0, len(mine), batch_size):
            items = [dataset[i] for i in mine[start : start + batch_size]]
            x = torch.stack([x for x, _ in items])
            dist = vae.encode(torch.cat([x, x.flip(-1)])).latent_dist
            n = len(items)
            parts["mean"].append(torch.stack([dist.mean[:n], dist.mean[n:]], 1).half())
            parts["std"].append(torch.stack([dist.std[:n], dist.std[n:]], 1).half())
            parts["labels"].append(torch.tensor([y for _, y in items]))
            if sum(len(lb) for lb in parts["labels"]) >= shard_size:
                flush()
    if parts["labels"]:
        flush()
    return shards


def test_extraction_writes_the_bytes_of_an_image_by_image_loop(tmp_path):
    """14 JPEGs, batches of 5, shards of 4 or more: one process with 2 workers and with none (through the command);
    two processes' shares (each process's DataLoader over its share, as main builds it)."""
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    vae.save_pretrained(tmp_path / "vae")
    root = jpeg_folder(tmp_path / "data")
    dataset = ImageFolder(root, image_size=8, hflip=False)
    expected = reference_shards(dataset, vae, 0, 1, batch_size=5, shard_size=4)
    assert len(expected) == 3
    common = ["--root", str(root), "--image-size", "8", "--vae", str(tmp_path / "vae"), "--batch-size", "5"]
    for workers in ("2", "0"):
        out = tmp_path / f"lat{workers}"
        extract([*common, "--shard-size", "4", "--out", str(out), "--workers", workers])
        assert {p.name: p.read_bytes() for p in out.glob("shard_*")} == expected
        assert json.loads((out / "meta.json").read_text())["count"] == 14
    for process in (0, 1):
        out = tmp_path / "two"
        out.mkdir(exist_ok=True)
        accelerator = SimpleNamespace(device=torch.device("cpu"), is_main_process=process == 0)
        loader = batches(share(dataset, process, 2), batch_size=5, workers=0, pin_memory=False)
        encode(loader, vae, accelerator, ShardWriter(out, process, shard_size=4), pixels=False, pixel_size=None)
        written = {p.name: p.read_bytes() for p in out.glob(f"shard_{process:03d}_*")}
        assert written == reference_shards(dataset, vae, process, 2, batch_size=5, shard_size=4)
    assert len(list(out.glob("shard_*"))) == 4  # 7 + 7 images: a shard of 5 and one of 2 per process


@pytest.mark.slow  # a torchrun of two processes: ~20 s on the 2-core machine
def test_two_processes_under_torchrun_write_the_bytes_of_their_shares(tmp_path):
    """python -m torch.distributed.run --nproc_per_node 2 -m dit.data.extract (gloo on the CPU, one thread each):
    each process's shards hold the bytes of its share encoded image by image (computed here on one thread too: the
    CPU convolutions' sums depend on the thread count)."""
    torch.manual_seed(0)
    vae = tiny_vae().eval()
    vae.save_pretrained(tmp_path / "vae")
    root = jpeg_folder(tmp_path / "data")
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    launcher += ["--master_port", str(29800 + os.getpid() % 90)]
    args = ["--root", str(root), "--image-size", "8", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "lat")]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [*launcher, "-m", "dit.data.extract", *args, "--batch-size", "5", "--shard-size", "4"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    dataset = ImageFolder(root, image_size=8, hflip=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = {name: data for p in (0, 1) for name, data in reference_shards(dataset, vae, p, 2, 5, 4).items()}
    finally:
        torch.set_num_threads(threads)
    assert {p.name: p.read_bytes() for p in (tmp_path / "lat").glob("shard_*")} == expected
    assert len(expected) == 4 and json.loads((tmp_path / "lat" / "meta.json").read_text())["count"] == 14


# --- finalize killed -------------------------------------------------------------------------------------------


def latents(path: Path, which: str) -> dict:
    """A latents directory standing for the old or the new ones: {file name: contents}."""
    path.mkdir()
    files = {"shard_000_00000.safetensors": f"{which} shard".encode(), "shard_001_00000.safetensors": which.encode()}
    if which == "old":
        files["meta.json"] = b'{"which": "old"}'
    for name, data in files.items():
        (path / name).write_bytes(data)
    return files


def contents(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in path.iterdir()}


def die_at(point: str, out: Path) -> None:
    """In the forked child: SIGKILL this process at ``point`` of finalize (out: the latents' final name)."""

    def die(*_args, **_kw):
        os.kill(os.getpid(), signal.SIGKILL)

    if point == "fsync":  # fsyncing the new files: nothing renamed yet
        dit.atomic.fsync_file = die
    elif point == "between_renames":  # out renamed to .<out>.old-<pid>, .<out>.tmp not yet renamed to out
        replace = os.replace
        calls = []
        os.replace = lambda *a: die() if calls else (calls.append(a), replace(*a))
    elif point == "after_renames":  # the new latents in place, the parent directory not yet fsynced
        fsync_dir = dit.atomic.fsync_dir
        dit.atomic.fsync_dir = lambda path: die() if Path(path) == out.parent else fsync_dir(path)
    elif point == "removing_old":  # the old copy partly removed
        shutil.rmtree = lambda path, **_: (next(Path(path).iterdir()).unlink(), die())


@pytest.mark.parametrize("point", ["fsync", "between_renames", "after_renames", "removing_old", "none"])
def test_a_process_killed_in_finalize_leaves_the_old_latents_or_the_new(tmp_path, point):
    """finalize in a forked process killed at each point: the old latents or the new ones under their name, or
    (between the swap's two renames) the old ones whole beside it; the next run puts them back and clears the rest."""
    out, tmp = tmp_path / "lat", tmp_path / ".lat.tmp"
    old, new = latents(out, "old"), latents(tmp, "new")
    dataset = type("Dataset", (), {"__len__": lambda self: 14, "num_classes": 2, "class_names": ["cats", "dogs"]})()
    vae = SimpleNamespace(config=SimpleNamespace(scaling_factor=0.18215))
    args = SimpleNamespace(image_size=16, vae="vae", source="imagefolder", root="data", pixels=False, pixel_size=None)
    pid = os.fork()
    if pid == 0:  # the child: finalize, killed at the point (or not); never back into pytest
        try:
            die_at(point, out)
            finalize(dataset, vae, args, tmp, out, 1)
        except BaseException:
            os._exit(1)
        os._exit(0)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    assert killed if point != "none" else os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    left = sorted(p.name for p in tmp_path.iterdir())
    if point == "between_renames":
        assert left == [f".lat.old-{pid}", ".lat.tmp"] and contents(tmp_path / f".lat.old-{pid}") == old
    elif point == "fsync":
        assert contents(out) == old and ".lat.tmp" in left
    else:
        assert new.items() < contents(out).items() and json.loads((out / "meta.json").read_text())["count"] == 14
    with pytest.raises(SystemExit, match="already holds latents"):  # the next run: the old ones back, or the new kept
        extract(["--root", str(tmp_path / "data"), "--vae", "vae", "--out", str(out)])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lat"]
    if point in ("fsync", "between_renames"):
        assert contents(out) == old
    else:
        assert new.items() < contents(out).items()
