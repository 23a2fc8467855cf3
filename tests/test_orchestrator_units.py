"""Probe selection, budget resolution, learned corrections and the child environment."""

import json

import pytest

from orchestrator.corrections import OOM_GROWTH, Corrections, oom_factor
from orchestrator.job import resolve_budget
from orchestrator.probe import ProbeError, SimulatedGpu, SimulatedProbe, select_gpu
from orchestrator.runner import AUTO_RESERVE, child_env

GiB = 2**30


def test_auto_gpu_is_the_one_with_most_free_memory() -> None:
    probe = SimulatedProbe(SimulatedGpu(80 * GiB, neighbour_bytes=70 * GiB), SimulatedGpu(24 * GiB))
    assert select_gpu(probe.gpus(), "auto").index == 1
    assert select_gpu(probe.gpus(), "0").index == 0
    with pytest.raises(ProbeError, match="no such GPU"):
        select_gpu(probe.gpus(), "7")
    with pytest.raises(ProbeError, match="--device cpu"):
        select_gpu([], "auto")


def test_a_neighbour_appearing_changes_free_memory() -> None:
    probe = SimulatedProbe(SimulatedGpu(24 * GiB))
    assert probe.gpus()[0].free == 24 * GiB
    probe.set_neighbour(0, 10 * GiB)
    g = probe.gpus()[0]
    assert g.free == 14 * GiB and g.processes[0].used_bytes == 10 * GiB


def test_budget_is_the_cap_but_never_more_than_is_free() -> None:
    gpu = SimulatedProbe(SimulatedGpu(24 * GiB, neighbour_bytes=16 * GiB)).gpus()[0]
    assert resolve_budget("4GB", gpu).bytes == 4 * GiB
    b = resolve_budget("12GB", gpu)
    assert b.bytes == 8 * GiB - AUTO_RESERVE and "only 8.0 GiB free" in b.source
    assert resolve_budget("auto", gpu).bytes == 8 * GiB - AUTO_RESERVE
    assert resolve_budget("6GB", None).bytes == 6 * GiB


def test_oom_factor_lifts_the_estimate_above_what_failed() -> None:
    f = oom_factor(predicted_allocator=10 * GiB, current_factor=1.0, failed_cap=11 * GiB, measured_allocator=None)
    assert f * 10 * GiB >= 11 * GiB * OOM_GROWTH
    g = oom_factor(10 * GiB, 1.0, 11 * GiB, measured_allocator=14 * GiB)
    assert g * 10 * GiB == pytest.approx(14 * GiB * OOM_GROWTH)
    assert oom_factor(10 * GiB, 3.0, 1 * GiB, None) == pytest.approx(3.0 * OOM_GROWTH)  # never shrinks


def test_corrections_persist_per_gpu_model_and_table(isolated_cache) -> None:
    a = Corrections("H100", "up2you@v1")
    assert a.factor("rgb") == 1.0
    assert a.learn("rgb", 1.4, "test") == 1.4
    assert a.learn("rgb", 1.2, "lower is ignored") == 1.4
    assert Corrections("H100", "up2you@v1").factors() == {"rgb": 1.4}
    assert Corrections("RTX 4090", "up2you@v1").factor("rgb") == 1.0
    assert Corrections("H100", "up2you@v2").factor("rgb") == 1.0
    data = json.loads((isolated_cache / "corrections.json").read_text())
    assert data["H100"]["up2you@v1"]["rgb"]["reason"] == "test"


def test_corrupt_corrections_file_starts_afresh(isolated_cache) -> None:
    isolated_cache.mkdir(parents=True)
    (isolated_cache / "corrections.json").write_text("{not json")
    assert Corrections("H100", "t@v1").factor("rgb") == 1.0


def test_child_env_pins_the_gpu_and_the_allocator() -> None:
    gpu = SimulatedProbe(SimulatedGpu(24 * GiB, uuid="GPU-abc")).gpus()[0]
    env = child_env(gpu)
    assert env["CUDA_VISIBLE_DEVICES"] == "GPU-abc"
    assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    assert child_env(None)["CUDA_VISIBLE_DEVICES"] == ""
