"""Test-wide environment. Set before anything imports triton, diffusers or wandb."""

import copy
import functools
import os

import pytest
import torch  # does not import triton

if not torch.cuda.is_available():  # with CUDA the kernels are compiled and tested on the GPU
    os.environ.setdefault("TRITON_INTERPRET", "1")  # Triton kernels run on the CPU interpreter
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may download at test time
os.environ.setdefault("WANDB_MODE", "disabled")

# Under pytest-xdist the cores are shared among the workers: one worker's torch (and the processes its tests
# start) take their share, so two workers on two cores do not each run two threads.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
_threads = max(1, min(2, (os.cpu_count() or 1) // _workers))
if _workers > 1:
    os.environ["OMP_NUM_THREADS"] = str(_threads)
torch.set_num_threads(_threads)

from pathlib import Path  # noqa: E402

from hydra import compose, initialize_config_dir  # noqa: E402

from dit.data import fashion_mnist  # noqa: E402
from dit.training.config import register_configs  # noqa: E402

register_configs()  # the training/optim/model schemas and the dit.* resolvers that compose() needs

# Shared by the test modules (``from conftest import ...``): the repository, the dataset, composing configs.
# Tiny models, VAEs and metrics reading: tests/helpers/tiny.py.
ROOT = Path(__file__).resolve().parents[1]
FMNIST = Path(fashion_mnist.ROOT) / "train-images-idx3-ubyte.gz"
needs_fmnist = pytest.mark.skipif(not FMNIST.exists(), reason="dataset-fashion-mnist not installed (make setup)")


def compose_config(name: str, overrides=(), **kwargs):
    """configs/<name>.yaml composed with overrides, as train.py / sample.py would see it: a fresh copy each call
    (callers change it), composed once per worker (Hydra's composition costs ~0.3 s; the configs do not change)."""
    return copy.deepcopy(_composed(name, tuple(overrides), tuple(sorted(kwargs.items()))))


@functools.lru_cache(maxsize=512)
def _composed(name: str, overrides: tuple, kwargs: tuple):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose(name, overrides=list(overrides), **dict(kwargs))


SMOKE = ["experiment=smoke", "training.log_every=1"]  # a smoke run that logs every step


def smoke_config(*overrides):
    """The train config of that smoke run, with overrides."""
    return compose_config("train", [*SMOKE, *overrides])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    """GPU tests are skipped without CUDA, never deleted."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def fmnist_test_stats(tmp_path_factory):
    """The domain metric's statistics of the Fashion-MNIST test split as a stats npz, computed once per worker: the
    reference of tests whose subject is not the reference (an FID of a few samples against it)."""
    from dit.eval.evaluator import Evaluator

    if not FMNIST.exists():
        pytest.skip("dataset-fashion-mnist not installed (make setup)")
    path = tmp_path_factory.mktemp("reference") / "fashion_mnist_test_stats.npz"
    Evaluator("fashion_mnist", "fashion_mnist:test", distributed=False).reference().save(path)
    return path
