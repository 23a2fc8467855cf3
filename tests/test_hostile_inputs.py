"""Forty-odd hostile inputs, each with its exact message and exit code (README: "Exit codes").

Every refusal is checked the same way (`_refused`): one line starting with `error:` (indented detail
lines may follow), the documented exit code, no traceback, and an earlier finished run in `--out`
left byte for byte as it was. Inputs that a user expects to work (grey, 16-bit, CMYK, palette,
animated, EXIF-rotated, 200 photos, links, non-UTF-8 names) are accepted, and the test checks what
the stages will see. The CLI runs in-process (`cli.main(argv)` returns the exit code); stage
processes run only where the problem is found inside a stage (no person, a disk that fills up, a
pickle payload in a checkpoint).
"""

from __future__ import annotations

import errno
import hashlib
import os
import pickle
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cli
from orchestrator.probe import SimulatedGpu, SimulatedProbe
from tests.conftest import write_cutouts, write_photos

ROOT = Path(__file__).resolve().parents[1]
GiB = 2**30
LIMIT_HINT = "re-export it as JPEG or PNG, or remove it"


# --- helpers --------------------------------------------------------------------------------------
def _run(capsys: pytest.CaptureFixture[str], argv: list[str]) -> tuple[int, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _error_line(text: str) -> str:
    """The one `error:` line; anything after it must be indented detail, and there is no traceback."""
    assert "Traceback" not in text, text
    lines = [ln for ln in text.splitlines() if ln.strip()]
    errors = [i for i, ln in enumerate(lines) if ln.startswith("error:")]
    assert len(errors) == 1, text
    assert all(ln.startswith("  ") for ln in lines[errors[0] + 1:]), text
    return lines[errors[0]]


def _previous_run(out: Path) -> dict[str, str]:
    """An earlier finished run in `out` (what a failed rerun must not touch); returns its snapshot."""
    (out / "job" / "segment").mkdir(parents=True)
    (out / "run.json").write_text('{"ok": true}')
    (out / "mesh.obj").write_text("v 0 0 0\n")
    (out / "job" / "segment" / "outputs.safetensors").write_bytes(b"finished bytes")
    (out / "job" / "segment" / "manifest.msgpack").write_bytes(b"\x81\xa3key\xa1k")
    return _snapshot(out)


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file's sha256, but the output lock's own files (orchestrator.outlock: not outputs)."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and not p.name.startswith(".up2you.")}  # fmt: skip


def _png_bytes(im: Image.Image) -> bytes:
    import io

    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid 1-bit PNG of side x side (400 Mpx), ~50 kB on disk, streamed so the test holds no big buffer."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), b"\x00" * (1 + side // 8), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b""))


def _rgba(size: tuple[int, int], box: tuple[int, int, int, int] | None) -> Image.Image:
    im = Image.new("RGBA", size, (90, 120, 200, 0))
    if box:
        im.paste((200, 150, 120, 255), box)
    return im


def _fake_weights(root: Path) -> Path:
    """Every checkpoint file in the released layout, each valid for its format (so only what a case breaks fails)."""
    import torch
    from safetensors.numpy import save_file

    from up2you.checkpoints import CHECKPOINTS

    for c in CHECKPOINTS.values():
        base = root / c.path
        for f in ([base / r for r in c.required_files] if c.path.endswith("/") else [base]):
            f.parent.mkdir(parents=True, exist_ok=True)
            if f.suffix == ".safetensors":
                save_file({"w": np.zeros(4, np.float32)}, str(f))
            elif f.suffix in (".pt", ".pth"):
                torch.save({"w": torch.zeros(4)}, f)
            elif f.suffix == ".npz":
                np.savez(f, w=np.zeros(4))
            elif f.suffix == ".npy":
                np.save(f, np.zeros(4))
            elif f.suffix == ".pkl":
                f.write_bytes(pickle.dumps({"w": np.zeros(4)}))
            else:
                f.write_text("{}")
    return root


class _Payload:
    """Unpickling this runs a shell command that creates a marker file: what a hostile .pt would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Callable[..., object], tuple[str]]:
        return os.system, (f"touch {self.marker}",)


def _payload_pt(path: Path, marker: Path) -> None:
    import torch

    torch.save({"w": torch.zeros(4), "x": _Payload(marker)}, path)


# --- refusals ---------------------------------------------------------------------------------------
# Each case: (setup(tmp) -> (argv, {name: value} for the expected line), exit code, expected line).
# argv runs `--tiny --device cpu` unless the case needs otherwise, so nothing but validation can run.
Setup = Callable[[Path, pytest.MonkeyPatch], tuple[list[str], dict[str, str]]]
TINY = ["--tiny", "--device", "cpu"]


def _photos_plus(extra: Callable[[Path], str]) -> Setup:
    """A folder of good photos plus one file made by `extra` (returns its name)."""
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
        d = write_photos(tmp / "photos", n=2)
        name = extra(d)
        return [str(d), *TINY], {"d": str(d), "f": str(d / name)}
    return setup


def _folder(make: Callable[[Path], None]) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
        d = tmp / "photos"
        make(d)
        return [str(d), *TINY], {"d": str(d)}
    return setup


def _option(*args: str, device: str = "cpu", gpus: int | None = None) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
        d = write_photos(tmp / "photos", n=2)
        if gpus is not None:
            probe = SimulatedProbe(*[SimulatedGpu(24 * GiB, name="Simulated 24G") for _ in range(gpus)])
            mp.setattr("orchestrator.probe.NvmlProbe", lambda: probe)
        return [str(d), *args, "--device", device, *(["--tiny"] if device == "cpu" else [])], {"d": str(d)}
    return setup


def _zero_byte(d: Path) -> str:
    (d / "empty.jpg").write_bytes(b"")
    return "empty.jpg"


def _truncated(fmt: str) -> Callable[[Path], str]:
    def make(d: Path) -> str:
        import io

        buf = io.BytesIO()
        Image.fromarray(np.random.default_rng(1).integers(0, 255, (96, 64, 3), np.uint8)).save(buf, format=fmt)
        data = buf.getvalue()
        (d / f"cut.{fmt.lower()}").write_bytes(data[: len(data) // 2])
        return f"cut.{fmt.lower()}"
    return make


def _one_pixel(d: Path) -> str:
    Image.new("RGB", (1, 1), (255, 0, 0)).save(d / "dot.png")
    return "dot.png"


def _bomb(d: Path) -> str:
    _bomb_png(d / "bomb.png")
    return "bomb.png"


def _transparent(d: Path) -> str:
    _rgba((64, 96), None).save(d / "ghost.png")
    return "ghost.png"


def _bad_name_corrupt(d: Path) -> str:
    name = b"caf\xe9-broken.png"  # Latin-1 e-acute: not UTF-8
    with open(os.path.join(os.fsencode(d), name), "wb") as f:
        f.write(b"this is not an image")
    return "caf\ufffd-broken.png"


def _empty(d: Path) -> None:
    d.mkdir()


def _only_hidden(d: Path) -> None:
    d.mkdir()
    (d / ".DS_Store").write_bytes(b"x")  # hidden files are not photos (a folder of sub-folders is a fleet)


def _only_non_images(d: Path) -> None:
    d.mkdir()
    (d / "notes.txt").write_text("hi")
    (d / "data.csv").write_text("1,2")


def _path_is_file(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    f = tmp / "photo.jpg"
    f.write_bytes(b"x")
    return [str(f), *TINY], {"f": str(f)}


def _path_missing(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    return [str(tmp / "nope"), *TINY], {"d": str(tmp / "nope")}


def _out_is_file(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    d = write_photos(tmp / "photos", n=2)
    (tmp / "out.txt").write_text("mine")
    return [str(d), *TINY, "--out", str(tmp / "out.txt")], {"o": str(tmp / "out.txt")}


def _out_is_input(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    d = write_photos(tmp / "photos", n=2)
    return [str(d), *TINY, "--out", str(d)], {"o": str(d)}


def _orchestrator_write_fails(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    """The orchestrator's own hand-off write (inputs.msgpack) hits a full disk."""
    from stages.jobfs import JobDir

    def full(self: JobDir, record: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(self.root / "inputs.msgpack"))

    mp.setattr(JobDir, "write_inputs", full)
    mp.setattr("orchestrator.job.ensure_tiny_weights", lambda *a: None)
    d = write_photos(tmp / "photos", n=2)
    return [str(d), *TINY], {}


def _weights_case(breaker: Callable[[Path], str]) -> Setup:
    def setup(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
        d = write_photos(tmp / "photos", n=2)
        w = _fake_weights(tmp / "weights")
        broken = breaker(w)
        return [str(d), "--device", "cpu", "--vram", "12GB", "--weights", str(w)], {"w": str(w), "f": str(w / broken)}
    return setup


def _remove_adapter(w: Path) -> str:
    (w / "pretrained_models/rgb_adapter.safetensors").unlink()
    return "pretrained_models/rgb_adapter.safetensors"


def _truncate_adapter(w: Path) -> str:
    from safetensors.numpy import save_file

    f = w / "pretrained_models/rgb_adapter.safetensors"
    save_file({"w": np.zeros(1000, np.float32)}, str(f))
    f.write_bytes(f.read_bytes()[:1500])
    return "pretrained_models/rgb_adapter.safetensors"


def _payload_predictor(w: Path) -> str:
    _payload_pt(w / "pretrained_models/shape_predictor.pt", w / "PWNED")
    return "pretrained_models/shape_predictor.pt"


def _garbage_config(w: Path) -> str:
    (w / "stable-diffusion-2-1-base/unet/config.json").write_text("{not json")
    return "stable-diffusion-2-1-base/unet/config.json"


def _no_nvml(tmp: Path, mp: pytest.MonkeyPatch) -> tuple[list[str], dict[str, str]]:
    import pynvml

    def fail() -> None:
        raise pynvml.NVMLError(pynvml.NVML_ERROR_LIBRARY_NOT_FOUND)

    mp.setattr(pynvml, "nvmlInit", fail)
    d = write_photos(tmp / "photos", n=2)
    return [str(d), "--vram", "12GB"], {}


CO2Y = "huggingface.co/Co2y/UP2You"
REFUSALS: list[tuple[str, Setup, int, str]] = [
    # the input folder
    ("empty-folder", _folder(_empty), 2, "input folder {d} is empty: add photos of one person (JPEG or PNG)"),
    ("only-hidden-files", _folder(_only_hidden), 2, "input folder {d} is empty: add photos of one person (JPEG or PNG)"),
    ("only-non-images", _folder(_only_non_images), 2,
     "input folder {d} has no images (found data.csv, notes.txt): add JPEG or PNG photos "
     "(jpg/jpeg/png/webp/bmp/tif/tiff/gif)"),
    ("path-is-a-file", _path_is_file, 2, "{f} is a file, not a folder: put the photos in a folder and pass the folder"),
    ("path-missing", _path_missing, 2, "input folder {d} does not exist: pass a folder of photos of one person"),
    # photos
    ("zero-byte-jpg", _photos_plus(_zero_byte), 65, "{f} is empty (0 bytes): copy the photo again or remove it"),
    ("truncated-png", _photos_plus(_truncated("PNG")), 65,
     "{f} is truncated (the file ends before the image does): copy it again, re-export it, or remove it"),
    ("truncated-jpeg", _photos_plus(_truncated("JPEG")), 65,
     "{f} is truncated (the file ends before the image does): copy it again, re-export it, or remove it"),
    ("one-pixel", _photos_plus(_one_pixel), 65, "{f} is 1x1 px, too small to show a person: use photos at least "
                                                "32 px on each side (512 px or more is best), or remove it"),
    ("20000x20000", _photos_plus(_bomb), 65,
     "{f} is 400.0 Mpx, above the 40 Mpx limit: resize it (e.g. to 4000 px on the long side) and run again"),
    ("all-transparent-rgba", _photos_plus(_transparent), 65,
     "{f} is fully transparent (its alpha channel is 0 everywhere): export it without the alpha channel, or remove it"),
    ("non-utf8-name-corrupt", _photos_plus(_bad_name_corrupt), 65,
     "{f} is not an image in a format we read (jpg/jpeg/png/webp/bmp/tif/tiff/gif): " + LIMIT_HINT),
    # options
    ("vram-0", _option("--vram", "0"), 2,
     "Invalid value for '--vram': '0': a memory size must be positive, like 12GB (see up2you-budget --help)"),
    ("vram-minus-1", _option("--vram", "-1"), 2,
     "Invalid value for '--vram': '-1': a memory size must be positive, like 12GB (see up2you-budget --help)"),
    ("vram-abc", _option("--vram", "abc"), 2,
     "Invalid value for '--vram': 'abc' is not a memory size; write it like 12GB, 11.5GiB or 800MB (GB = 2^30 bytes) "
     "(see up2you-budget --help)"),
    ("vram-12XB", _option("--vram", "12XB"), 2,
     "Invalid value for '--vram': '12XB': unknown unit 'XB'; write it like 12GB, 11.5GiB or 800MB "
     "(units: GB/GiB/G, MB/MiB/M, TB) (see up2you-budget --help)"),
    ("vram-1e99GB", _option("--vram", "1e99GB"), 2,
     "Invalid value for '--vram': '1e99GB' is more memory than any GPU has (limit 16 TB); write the card's size, "
     "like 80GB, or use auto (see up2you-budget --help)"),
    ("vram-100TB", _option("--vram", "100TB"), 2,
     "Invalid value for '--vram': '100TB' is more memory than any GPU has (limit 16 TB); write the card's size, "
     "like 80GB, or use auto (see up2you-budget --help)"),
    ("vram-above-the-card", _option("--vram", "48GB", device="cuda", gpus=1), 2,
     "--vram 48GB is more than GPU 0 (Simulated 24G) has in total (24.0 GiB): pass at most 24GB, or auto, "
     "or pick another GPU with --gpu"),
    ("views-7", _option("--views", "7"), 2,
     "Invalid value for --views: '7': expected auto or 20|12|6 (see up2you-budget --help)"),
    ("steps-0", _option("--steps", "0"), 2, "Invalid value for --steps: '0': expected a positive number of denoising "
                                            "steps, like 50 (see up2you-budget --help)"),
    ("thg-interval-0", _option("--thg-interval", "0"), 2,
     "Invalid value for --thg-interval: '0': expected auto or a positive integer (see up2you-budget --help)"),
    ("gpu-9", _option("--gpu", "9", device="cuda", gpus=1), 2,
     "--gpu 9: no such GPU; this machine has GPU 0 (see `up2you-budget gpus`), or use --gpu auto"),
    ("resolution-300", _option("--resolution", "300"), 2,
     "Invalid value for --resolution: '300': expected auto or 768|512 (see up2you-budget --help)"),
    ("wait-for-vram-abc", _option("--wait-for-vram", "abc"), 2,
     "Invalid value for '--wait-for-vram': 'abc' is not a duration; write it like 90s, 10m or 1h "
     "(see up2you-budget --help)"),
    ("device-tpu", _option("--vram", "12GB", device="tpu"), 2,
     "Invalid value for --device: 'tpu': expected cuda or cpu (see up2you-budget --help)"),
    ("out-is-a-file", _out_is_file, 2, "--out {o} is a file: pass a folder (it is created if missing)"),
    ("out-is-the-input", _out_is_input, 2, "--out {o} is the photo folder itself: the next run would read the outputs "
                                           "as photos; pass another folder (the default is <photos>_up2you/)"),
    ("orchestrator-write-disk-full", _orchestrator_write_fails, 74,
     "cannot write {out}/job/inputs.msgpack: No space left on device; free space (or pass --out on another disk) and "
     "rerun: finished stages are kept"),
    # weights and device
    ("missing-weight-file", _weights_case(_remove_adapter), 66,
     "1 weight file(s) missing, first {f} (looked in --weights ({w}), ./weights ({cwd}/weights), Hugging Face cache "
     "({hf}), torch.hub cache ({hub})); get them with `up2you-budget weights fetch --accept-smplx-license`, or run "
     "with --tiny for a smoke test"),
    ("truncated-safetensors", _weights_case(_truncate_adapter), 66,
     "weight file {f} is truncated (1500 of 4072 bytes): refused; get it again from " + CO2Y),
    ("pickle-payload-pt", _weights_case(_payload_predictor), 66,
     "weight file {f} holds a pickle that would call posix.system (code, not tensors): refused; get it again from "
     + CO2Y),
    ("garbage-config-json", _weights_case(_garbage_config), 66,
     "weight file {f} is damaged (JSONDecodeError: Expecting property name enclosed in double quotes: line 1 "
     "column 2 (char 1)): refused; get it again from huggingface.co/Manojb/stable-diffusion-2-1-base (mirror of "
     "the removed stabilityai/stable-diffusion-2-1-base)"),
    ("no-gpu", _option("--vram", "12GB", device="cuda", gpus=0), 69,
     "no NVIDIA GPU found; use --device cpu --tiny for a CPU smoke test"),
    ("no-nvml", _no_nvml, 69, "cannot talk to the NVIDIA driver (NVML Shared Library Not Found); no GPU here? "
                              "Use --device cpu --tiny for a smoke test"),
]


@pytest.mark.parametrize(("setup", "code", "expected"), [c[1:] for c in REFUSALS], ids=[c[0] for c in REFUSALS])
def test_refused_with_one_line(setup: Setup, code: int, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    argv, names = setup(tmp_path, monkeypatch)
    if "o" in names:  # the case is about --out itself: it must stay as it was
        out = Path(names["o"])
        before = _snapshot(out) if out.is_dir() else {"": out.read_text()}
    else:  # an earlier finished run in --out must survive the refusal untouched
        out = tmp_path / "previous"
        before = _previous_run(out)
        argv += ["--out", str(out)]
    code_got, text = _run(capsys, argv)
    where = {"out": out, "cwd": os.getcwd(), "hf": tmp_path / "hf-cache", "hub": tmp_path / "torch-home/hub/checkpoints"}
    assert (code_got, _error_line(text)) == (code, "error: " + expected.format(**where, **names))
    assert (_snapshot(out) if out.is_dir() else {"": out.read_text()}) == before
    if "w" in names:
        assert not (Path(names["w"]) / "PWNED").exists()  # the payload never ran


def test_out_read_only(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--out on a read-only file system (a read-only tmpfs as root, a mode-555 folder otherwise): exit 74."""
    d = write_photos(tmp_path / "photos", n=2)
    ro = tmp_path / "ro"
    ro.mkdir()
    mounted = _mount(ro, "ro,size=1m")
    if not mounted:
        if os.geteuid() == 0:
            pytest.skip("root without mount: a read-only folder cannot be made here")
        ro.chmod(0o555)
    try:
        code, text = _run(capsys, [str(d), *TINY, "--out", str(ro / "out")])
        reason = "Read-only file system" if mounted else "Permission denied"
        assert (code, _error_line(text)) == (74, f"error: --out {ro / 'out'} is not writable ({reason}): pass a folder "
                                                 "you can write to, e.g. --out ~/up2you_out")  # fmt: skip
    finally:
        _umount(ro) if mounted else ro.chmod(0o755)


def test_out_on_a_full_disk_stops_before_any_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A 1 MB tmpfs where mounting is allowed (else a patched disk_usage): exit 74 before any stage."""
    d = write_photos(tmp_path / "photos", n=2)
    small = tmp_path / "small"
    small.mkdir()
    mounted = _mount(small, "size=1m")
    if not mounted:
        import shutil
        from collections import namedtuple

        monkeypatch.setattr(shutil, "disk_usage", lambda p: namedtuple("u", "total used free")(2**20, 0, 2**20))
    try:
        code, text = _run(capsys, [str(d), *TINY, "--views", "6", "--out", str(small / "out")])
        line = _error_line(text)
        assert code == 74
        assert line.startswith(f"error: not enough disk in {small / 'out'}: 0.0 GB free, this run needs about ")
        assert line.endswith(" GB; free space or pass --out on another disk")
        assert not (small / "out" / "job").exists()
    finally:
        if mounted:
            _umount(small)


def _mount(where: Path, opts: str) -> bool:
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], capture_output=True).returncode == 0


def _umount(where: Path) -> None:
    subprocess.run(["umount", str(where)], capture_output=True)


def test_the_pixel_limit_is_checked_before_decoding(tmp_path: Path) -> None:
    """The 20000x20000 PNG (a 400 MB decode at 1 byte/px) is refused with the scan's memory staying small."""
    d = tmp_path / "photos"
    d.mkdir()
    _bomb_png(d / "bomb.png")
    # VmHWM: this process image's peak RSS (ru_maxrss would carry pytest's own peak across exec)
    probe = ("from orchestrator.inputs import InputError, scan_inputs\n"
             f"try:\n    scan_inputs({str(d)!r})\nexcept InputError as e:\n    print(e.exit_code, e)\n"
             "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
             "print(int(hwm.split()[1]) // 1024)")  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT, timeout=120)
    first, peak_mib = proc.stdout.splitlines()[0], int(proc.stdout.splitlines()[-1])
    assert first.startswith("65 ") and "400.0 Mpx, above the 40 Mpx limit" in first
    assert peak_mib < 200, f"the scan peaked at {peak_mib} MiB: it decoded the image"
    from up2you.encoders.preprocess import PhotoError, open_photo

    with pytest.raises(PhotoError, match="400000000 pixels.* is far above the pixel limit"):
        open_photo(d / "bomb.png", 40_000_000)  # the segment stage's own guard


# --- inside a stage: no person, a disk that fills up, a pickle payload -------------------------------
@pytest.fixture(scope="module")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One cache (tiny weights written once) for the few cases that start stage processes."""
    from rich.console import Console

    from orchestrator.job import ensure_tiny_weights

    cache = tmp_path_factory.mktemp("tiny-cache")
    ensure_tiny_weights(cache / "tiny-weights", Console(quiet=True))
    return cache


def _stage_run(capsys: pytest.CaptureFixture[str], mp: pytest.MonkeyPatch, cache: Path, photos: Path, out: Path,
               faults: str = "") -> tuple[int, str]:  # fmt: skip
    mp.setenv("UP2YOU_CACHE_DIR", str(cache))
    if faults:
        mp.setenv("UP2YOU_FAULTS", faults)
    return _run(capsys, [str(photos), *TINY, "--views", "6", "--out", str(out)])


@pytest.mark.slow
def test_photo_with_no_person(tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """A cut-out whose alpha holds a 4x4 speck (0.04 % of the photo): the segment stage exits 65 naming it."""
    d = tmp_path / "photos"
    d.mkdir()
    _rgba((200, 200), (98, 98, 102, 102)).save(d / "speck.png")
    code, text = _stage_run(capsys, monkeypatch, tiny_cache, d, tmp_path / "out")
    assert (code, _error_line(text)) == (65, f"error: stage segment failed (bad input): {d / 'speck.png'}: no person "
                                             "found (its own alpha covers 0.04% of the photo, below 0.5%); use a photo "
                                             "in which the person is clearly visible, or remove it")  # fmt: skip


def test_no_person_criterion() -> None:
    """The criterion itself: at least half-opaque on >= 0.5 % of the pixels (README, "No person")."""
    from stages.segment import MIN_PERSON_COVERAGE, person_coverage

    assert MIN_PERSON_COVERAGE == 0.005
    assert person_coverage(_rgba((100, 100), (0, 0, 5, 10))) == 0.005  # 50 of 10000 pixels: just a person
    assert person_coverage(_rgba((100, 100), (0, 0, 7, 7))) < 0.005
    faint = Image.new("RGBA", (100, 100), (0, 0, 0, 127))  # a matte that is unsure everywhere is no person
    assert person_coverage(faint) == 0.0


@pytest.mark.slow
def test_disk_fills_up_inside_a_stage(tiny_cache: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """ENOSPC injected at segment's first output write: exit 74, one line with the fix, no half-written file."""
    photos, out = write_cutouts(tmp_path / "photos"), tmp_path / "out"
    code, text = _stage_run(capsys, monkeypatch, tiny_cache, photos, out, faults="segment:enospc")
    assert (code, _error_line(text)) == (74, "error: stage segment failed (disk full or unwritable): [Errno 28] No "
                                             "space left on device (injected by UP2YOU_FAULTS); free space where "
                                             f"{out / 'job'} is (or pass --out on another disk) and rerun: finished "
                                             "stages are kept")  # fmt: skip
    assert not [p for p in (out / "job" / "segment").iterdir() if p.name.startswith(".tmp-")]
    assert not (out / "job" / "segment" / "manifest.msgpack").exists()


@pytest.mark.slow
def test_pickle_payload_in_a_checkpoint_is_refused_by_the_stage(tiny_cache: Path, tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str],
                                                                monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """--tiny skips the preflight, so the features stage's own loader meets the payload: weights_only refuses it,
    the marker is never created, exit 66, and the finished segment stage is kept."""
    import shutil

    from stages.jobfs import JobDir

    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    target = cache / "tiny-weights" / "pretrained_models" / "shape_predictor.pt"
    marker = tmp_path / "PWNED"
    _payload_pt(target, marker)
    photos, out = write_cutouts(tmp_path / "photos"), tmp_path / "out"
    code, text = _stage_run(capsys, monkeypatch, cache, photos, out)
    assert (code, _error_line(text)) == (66, f"error: stage features failed (missing or damaged weights): {target} holds a "
                                             "pickle that would call posix.system (torch.load weights_only=True "
                                             "refused it): refused; get it again from " + CO2Y)  # fmt: skip
    assert not marker.exists()
    job = JobDir(out / "job")
    manifest = job.read_manifest("segment")
    assert manifest is not None and job.is_done("segment", manifest["key"])  # nothing finished lost


def test_loader_refuses_a_pickle_payload(tmp_path: Path) -> None:
    """The loaders' own defence (weights_only=True), without the preflight: nothing runs."""
    from up2you.checkpoints import DamagedWeightsError
    from up2you.state_dict import read_state_dict

    marker = tmp_path / "PWNED"
    _payload_pt(tmp_path / "evil.pt", marker)
    with pytest.raises(DamagedWeightsError, match="would call posix.system"):
        read_state_dict(tmp_path / "evil.pt")
    assert not marker.exists()


# --- accepted: what a user expects to just work ------------------------------------------------------
def _plan(capsys: pytest.CaptureFixture[str], d: Path) -> tuple[int, str]:
    return _run(capsys, [str(d), "--vram", "12GB", "--device", "cpu", "--plan"])


def _exif_rotated(path: Path) -> None:
    """80x40 stored, EXIF orientation 6 (rotate 90 CW to view): a red block at the stored top-left."""
    im = Image.new("RGB", (80, 40), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 10, 10))
    exif = Image.Exif()
    exif[0x0112] = 6
    im.save(path, exif=exif, quality=95)


def _animated(suffix: str, frames: int) -> Callable[[Path], None]:
    def make(p: Path) -> None:
        rest = [Image.new("RGB", (64, 48), (0, 60 * i, 255)) for i in range(frames - 1)]
        Image.new("RGB", (64, 48), (255, 0, 0)).save(p.with_suffix(suffix), save_all=True, append_images=rest)
    return make


ACCEPTED: list[tuple[str, Callable[[Path], None], tuple[int, int], tuple[int, int], tuple[int, int, int], str]] = [
    # (id, make(path), the RGB size open_photo gives, where to look, the colour there, the note the plan prints)
    ("grey", lambda p: Image.new("L", (64, 48), 77).save(p.with_suffix(".jpg")), (64, 48), (0, 0), (77, 77, 77), ""),
    ("16-bit", lambda p: Image.fromarray(np.full((48, 64), 40000, np.uint16)).save(p.with_suffix(".png")),
     (64, 48), (0, 0), (156, 156, 156), ""),  # 40000/65535 of white, not clipped to 255
    ("cmyk", lambda p: Image.new("CMYK", (64, 48), (0, 255, 255, 0)).save(p.with_suffix(".jpg"), quality=100),
     (64, 48), (0, 0), (255, 0, 0), ""),
    ("palette", lambda p: Image.new("RGB", (64, 48), (0, 128, 0)).convert("P", palette=Image.Palette.ADAPTIVE).save(p.with_suffix(".png")),
     (64, 48), (0, 0), (0, 128, 0), ""),
    ("animated-gif", _animated(".gif", 3), (64, 48), (0, 0), (255, 0, 0),
     "note: odd.gif is animated (3 frames): using its first frame"),
    ("animated-png", _animated(".png", 2), (64, 48), (0, 0), (255, 0, 0),
     "note: odd.png is animated (2 frames): using its first frame"),
    # stored 80x40 with the red block top-left; viewed (rotated 90 degrees clockwise) it is 40x80, block top-right
    ("exif-rotated-jpeg", lambda p: _exif_rotated(p.with_suffix(".jpg")), (40, 80), (39, 0), (255, 0, 0), ""),
]


@pytest.mark.parametrize(("make", "size", "at", "colour", "note"), [c[1:] for c in ACCEPTED],
                         ids=[c[0] for c in ACCEPTED])  # fmt: skip
def test_odd_photo_kinds_are_converted(make: Callable[[Path], None], size: tuple[int, int], at: tuple[int, int],
                                       colour: tuple[int, int, int], note: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:  # fmt: skip
    """Planned without complaint (a note for animations), and decoded by the segment stage's reader to RGB."""
    from up2you.encoders.preprocess import open_photo

    d = tmp_path / "photos"
    d.mkdir()
    make(d / "odd")
    (photo,) = list(d.iterdir())
    code, text = _plan(capsys, d)
    assert code == 0, text
    assert [ln for ln in text.splitlines() if ln.startswith("note:")] == ([note] if note else [])
    im = open_photo(photo)
    assert (im.mode, im.size) == ("RGB", size)
    assert np.abs(np.subtract(im.getpixel(at), colour)).max() <= 12, im.getpixel(at)  # JPEG rounding


def test_two_hundred_photos_use_a_bounded_spread(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from orchestrator.inputs import MAX_PHOTOS, scan_inputs

    d = write_photos(tmp_path / "photos", n=1)
    for i in range(200):
        (d / f"img_{i:03d}.jpg").write_bytes((d / "photo_0.jpg").read_bytes())
    (d / "photo_0.jpg").unlink()
    code, text = _plan(capsys, d)
    assert code == 0, text
    assert ("note: 200 photos: using 32 of them (the limit), spread evenly over the name order; put your best 32 in "
            "a folder to choose them yourself") in text  # fmt: skip
    names = [p.path.name for p in scan_inputs(d).photos]
    assert len(names) == MAX_PHOTOS == 32 and names[0] == "img_000.jpg" and names[-1] == "img_193.jpg"
    assert len(set(names)) == 32


def test_links_out_of_the_folder_are_ignored(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A link to a photo elsewhere and a link to /dev/zero (which would never end a hash): both ignored with
    a note; a link inside the folder is used."""
    from orchestrator.inputs import scan_inputs

    d = write_photos(tmp_path / "photos", n=1)
    outside = write_photos(tmp_path / "elsewhere", n=1) / "photo_0.jpg"
    (d / "away.jpg").symlink_to(outside)
    (d / "zero.jpg").symlink_to("/dev/zero")
    (d / "same.jpg").symlink_to(d / "photo_0.jpg")
    code, text = _plan(capsys, d)
    assert code == 0, text
    assert (f"note: away.jpg is a link to {outside}, outside {d} or not a file: ignored (copy the photo into the "
            "folder to use it)") in text  # fmt: skip
    assert f"note: zero.jpg is a link to /dev/zero, outside {d} or not a file" in text
    assert [p.path.name for p in scan_inputs(d).photos] == ["photo_0.jpg", "same.jpg"]


def test_non_utf8_file_names_reach_the_stage(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A Latin-1 name works: planned, recorded as the file system's bytes, and opened by the stage as written."""
    from orchestrator.inputs import scan_inputs
    from stages.harness import StageContext
    from stages.jobfs import JobDir

    d = write_photos(tmp_path / "photos", n=1)
    raw = os.path.join(os.fsencode(d), b"ren\xe9e.jpg")
    os.rename(d / "photo_0.jpg", raw)
    code, text = _plan(capsys, d)
    assert code == 0, text
    inputs = scan_inputs(d)
    JobDir(tmp_path / "job").write_inputs(inputs.record())
    (seen,) = StageContext(tmp_path / "job", "segment", "", "tiny").input_photos()
    assert os.fsencode(seen) == raw and seen.is_file()
    assert JobDir(tmp_path / "job").read_inputs()["photos"][0]["name"].endswith("ren\ufffde.jpg")
