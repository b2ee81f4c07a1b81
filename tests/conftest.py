"""Shared test fixtures: offline hub, a fixed seed and the default dtype restored per test,
synthetic images, one-thread torch for timing-heavy modules."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

# Every Ray the tests start is private to this machine (loopback only), and DeepSpeed takes its
# CPU accelerator: both are read when Ray and DeepSpeed are imported, as the CLI arranges.
from pipelines.common.ray_init import prepare_env  # noqa: E402

prepare_env(local=True)

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _private_scan_cache(tmp_path_factory):
    """Manifest scans the jobs keep for reuse go to a folder of this session, not ~/.cache."""
    previous = os.environ.get("MOVA_SCAN_CACHE")
    os.environ["MOVA_SCAN_CACHE"] = str(tmp_path_factory.mktemp("scans"))
    yield
    if previous is None:
        os.environ.pop("MOVA_SCAN_CACHE", None)
    else:
        os.environ["MOVA_SCAN_CACHE"] = previous


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    """Seed torch before each test and restore the global default dtype after it."""
    dtype = torch.get_default_dtype()
    torch.manual_seed(0)
    yield
    torch.set_default_dtype(dtype)


def _noise_image(seed: int, width: int = 64, height: int = 64) -> Image.Image:
    rng = np.random.RandomState(seed)
    return Image.fromarray((rng.rand(height, width, 3) * 255).astype("uint8"))


def _png_file(path: Path, size: int | tuple[int, int] = 16,
              color: tuple[int, int, int] = (200, 30, 30)) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size) if isinstance(size, int) else size, color).save(path)
    return str(path)


@pytest.fixture(scope="session")
def noise_image():
    """``noise_image(seed, width=64, height=64)``: a reproducible RGB image of uniform noise."""
    return _noise_image


@pytest.fixture(scope="session")
def png_file():
    """``png_file(path, size=16, color=(200, 30, 30))``: write a one-colour PNG (folders
    created); returns its path as a string."""
    return _png_file


@pytest.fixture(scope="module")
def one_thread():
    """Tiny tensors on a shared, busy CPU run many times faster on one thread; restored after
    the module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def local_cluster():
    """cluster/local_cluster.py imported as a module (a script, not a package module)."""
    import importlib.util
    import sys

    name = "local_cluster"
    if name not in sys.modules:
        path = Path(__file__).resolve().parents[1] / "cluster" / "local_cluster.py"
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]
