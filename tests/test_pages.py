"""Weights made resident before `go`: the kernel's populate path, and the same tensors after it."""

from __future__ import annotations

import platform
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from up2you.pages import make_resident, populate


def _kernel_at_least(major: int, minor: int) -> bool:
    try:
        parts = platform.release().split(".")
        return (int(parts[0]), int(parts[1].split("-")[0])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def test_mapped_weights_are_read_in_and_unchanged(tmp_path: Path) -> None:
    weights = {"a": torch.randn(300, 517), "b": torch.arange(7, dtype=torch.int64), "empty": torch.zeros(0)}
    save_file(weights, tmp_path / "w.safetensors")
    mapped = load_file(tmp_path / "w.safetensors")
    make_resident(mapped.values())
    assert all(torch.equal(mapped[k], weights[k]) for k in weights)
    assert not populate(mapped["empty"])  # nothing to read: the caller's loop skips it


@pytest.mark.skipif(not (platform.system() == "Linux" and _kernel_at_least(5, 14)), reason="MADV_POPULATE_READ")
def test_linux_populates_in_the_kernel(tmp_path: Path) -> None:
    save_file({"a": torch.randn(1000, 1000)}, tmp_path / "w.safetensors")
    t = load_file(tmp_path / "w.safetensors")["a"]
    assert populate(t)  # one madvise call, no per-page touching
    assert populate(t[17:, 3:])  # a view that starts inside a page: the range is aligned down
