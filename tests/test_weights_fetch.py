"""`weights fetch` through the real huggingface_hub calls, against a fake hub on 127.0.0.1."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from rich.console import Console

from orchestrator.fetch import FetchFile, fetch, fetch_files, licence_notice, select
from tests.hubserver import FakeHub
from up2you.checkpoints import DOWNLOADS, Download, Expected

ADAPTER = b"adapter-weights-" * 4096  # 64 KiB: big enough to be cut in half
MANO = b"mano-ids"


def _sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def _files(expected_adapter: bytes = ADAPTER) -> list[FetchFile]:
    """The registry's real download entries for two checkpoints, with expectations for our tiny files."""
    downloads = [DOWNLOADS["rgb_adapter"], DOWNLOADS["mano_ids"]]
    expected = {"pretrained_models/rgb_adapter.safetensors": Expected(len(expected_adapter), _sha(expected_adapter),
                                                                      "test"),
                "human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl": Expected(len(MANO), _sha(MANO), "test")}  # fmt: skip
    return fetch_files(downloads, expected)


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch):
    files = {"Co2y/UP2You/pretrained_models/rgb_adapter.safetensors": ADAPTER,
             "Co2y/UP2You/human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl": MANO}  # fmt: skip
    with FakeHub(files) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
        from huggingface_hub import constants

        # conftest sets HF_HUB_OFFLINE=1 for every test, and huggingface_hub reads it once, at import
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        yield server


def _console() -> Console:
    return Console(stderr=True, quiet=True)


def test_good_download_lands_where_the_stages_look_and_a_rerun_asks_nothing(hub: FakeHub, tmp_path: Path) -> None:
    r = fetch(tmp_path, _files(), accept_licence=True, console=_console())
    assert r.ok, r.failed
    assert (tmp_path / "pretrained_models/rgb_adapter.safetensors").read_bytes() == ADAPTER
    assert (tmp_path / "human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl").read_bytes() == MANO
    assert sorted(r.fetched) == ["human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl",
                                 "pretrained_models/rgb_adapter.safetensors"]  # fmt: skip
    assert all(v.checked == "sha256" for v in r.verified)
    n = len(hub.requests)
    again = fetch(tmp_path, _files(), accept_licence=True, console=_console())
    assert again.ok and again.fetched == [] and len(again.verified) == 2
    assert len(hub.requests) == n  # everything verified: no request at all


def test_an_interrupted_download_resumes_where_it_stopped(hub: FakeHub, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    # the library writes whole chunks (10 MB); small ones make a 64 KiB file behave like a 700 MB one
    monkeypatch.setattr(constants, "DOWNLOAD_CHUNK_SIZE", 4096)
    hub.cut_once.add("Co2y/UP2You/pretrained_models/rgb_adapter.safetensors")
    first = fetch(tmp_path, _files()[:1], accept_licence=True, console=_console())
    assert not first.ok and "run `up2you-budget weights fetch` again" in first.failed[0]
    assert not (tmp_path / "pretrained_models/rgb_adapter.safetensors").exists()
    hub.healthy()
    second = fetch(tmp_path, _files()[:1], accept_licence=True, console=_console())
    assert second.ok, second.failed
    assert (tmp_path / "pretrained_models/rgb_adapter.safetensors").read_bytes() == ADAPTER
    ranges = [rng for _, _, rng in hub.fetched("rgb_adapter.safetensors") if rng]
    assert ranges and ranges[-1] == f"bytes={len(ADAPTER) // 2}-"  # only the missing half was asked for


def test_a_file_with_the_wrong_sha256_is_refused_with_its_message(hub: FakeHub, tmp_path: Path) -> None:
    r = fetch(tmp_path, _files(expected_adapter=b"x" * len(ADAPTER))[:1], accept_licence=True, console=_console())
    assert not r.ok and len(r.failed) == 1
    line = r.failed[0]
    assert "rgb_adapter.safetensors" in line and "sha256" in line and "expected" in line
    assert _sha(ADAPTER)[:16] in line and _sha(b"x" * len(ADAPTER))[:16] in line
    assert "\n" not in line
    assert not (tmp_path / "pretrained_models/rgb_adapter.safetensors").exists()  # removed: the next fetch retries


def test_without_accepting_the_smplx_licence_nothing_under_it_is_fetched(hub: FakeHub, tmp_path: Path) -> None:
    r = fetch(tmp_path, _files(), accept_licence=False, console=_console())
    assert r.ok and r.fetched == ["pretrained_models/rgb_adapter.safetensors"]
    assert [f.key for f in r.not_accepted] == ["mano_ids"]
    assert not (tmp_path / "human_models").exists()
    assert hub.fetched("MANO_SMPLX_vertex_ids.pkl") == [] and not any("human_models" in p for _, p, _ in hub.requests)
    notice = licence_notice(r.not_accepted)
    assert "smpl-x.is.tue.mpg.de" in notice and "--accept-smplx-license" in notice


def test_a_url_download_goes_through_torch_hub_and_a_short_file_is_refused(tmp_path: Path) -> None:
    body = b"dinov2-bytes" * 100
    with FakeHub({}, urls={"/dinov2.pth": body, "/short.pth": body[:-5]}) as server:
        good = fetch_files([Download("dinov2", "dinov2", url=server.url + "/dinov2.pth")],
                           {"dinov2/dinov2_vitl14_pretrain.pth": Expected(len(body), None, "test")})  # fmt: skip
        r = fetch(tmp_path, good, accept_licence=False, console=_console())
        assert r.ok, r.failed
        assert (tmp_path / "dinov2/dinov2_vitl14_pretrain.pth").read_bytes() == body
        assert r.verified[0].sha256 == _sha(body)  # hashed so that run.json can record it
        short = [FetchFile("dinov2", "dinov2/other.pth", "dinov2", url=server.url + "/short.pth",
                           expected=Expected(len(body), None, "test"))]  # fmt: skip
        bad = fetch(tmp_path, short, accept_licence=False, console=_console())
        assert not bad.ok and f"expected {len(body):,}" in bad.failed[0]


def test_only_names_unknown_keys() -> None:
    with pytest.raises(ValueError, match="unknown checkpoint; known: sd21"):
        select(["sd21", "nope"])
    assert [d.key for d in select(["dinov2"])] == ["dinov2"]
