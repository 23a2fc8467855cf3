"""Shared fixtures: photo folders, the fake pipeline and its table, a simulated GPU, an isolated cache."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from budgets.table import BudgetTable, load_table
from orchestrator import runner
from orchestrator.probe import SimulatedGpu, SimulatedProbe
from tests.fakestages import TABLE_PATH

GiB = 2**30


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Learned corrections, tiny weights, weight caches and the GPU ledger go to per-test folders, never ~/.cache."""
    cache = tmp_path / "cache"
    monkeypatch.setenv("UP2YOU_CACHE_DIR", str(cache))
    monkeypatch.setenv("UP2YOU_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("UP2YOU_SIMULATED_GPUS", raising=False)
    monkeypatch.delenv("UP2YOU_FAULTS", raising=False)
    monkeypatch.delenv("FAKE_RUN_S", raising=False)
    # weights are looked for in the Hugging Face and torch.hub caches too: never this machine's real ones
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("UP2YOU_WEIGHTS", raising=False)
    return cache


@pytest.fixture(autouse=True)
def no_hand_back_unless_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CPU attempt looks for the GPU again after RECLAIM_AFTER_S (5 s). On a loaded 2-core machine a fake stage's
    CPU attempt can outlast that, and is then handed back if the GPU has room: tests of the fallback itself
    would see attempts they do not expect, so the look comes late; the hand-back tests set their own."""
    monkeypatch.setattr(runner, "RECLAIM_AFTER_S", 600.0)


def write_photos(folder: Path, n: int = 3, size: tuple[int, int] = (48, 64)) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(folder / f"photo_{i}.jpg")
    return folder


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    return write_photos(tmp_path / "photos")


@pytest.fixture
def fake_table() -> BudgetTable:
    return load_table(TABLE_PATH)


@pytest.fixture
def gpu24() -> SimulatedProbe:
    return SimulatedProbe(SimulatedGpu(24 * GiB, name="Simulated 24G"))


def write_cutouts(folder: Path, n: int = 2) -> Path:
    """`n` RGBA photos of a plain standing block with its own alpha: segment keeps the alpha (no matting)."""
    folder.mkdir(parents=True)
    for i in range(n):
        im = Image.new("RGBA", (90, 150), (90, 120, 200, 0))
        im.paste((200, 150, 120, 255), (30, 10 + i, 60, 140))
        im.save(folder / f"photo_{i}.png")
    return folder
