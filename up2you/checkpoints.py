"""Where each released checkpoint lives inside `--weights DIR`, where to get it, and what it must hash to.

The layout follows upstream UP2You (`pretrained_models/`, `human_models/` as in `Co2y/UP2You`)
plus one folder per third-party model in its own released layout. Torch-free: the orchestrator
checks for missing or wrong files before it starts a single process, and `weights fetch` reads
its download list (`DOWNLOADS`) and expected sizes/hashes (`EXPECTED`) from here.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# Written last by `up2you.fullsize` into a folder of full-size RANDOM checkpoints (benchmarks): the files are
# in the released layout and load strictly, but are not the released bytes, so their sizes and hashes are
# not checked against the release (they could never match).
STAND_IN_MARKER = ".full-files"


@dataclass(frozen=True)
class Checkpoint:
    key: str
    path: str  # relative to the weights folder; a folder ends with "/"
    source: str  # where a user gets it
    required_files: tuple[str, ...] = ()  # for folders: files that must be inside

    def missing(self, root: Path) -> list[str]:
        base = Path(root) / self.path
        if self.path.endswith("/"):
            if not base.is_dir():
                return [str(base) + "/"]
            return [str(base / f) for f in self.required_files if not (base / f).exists()]
        return [] if base.is_file() else [str(base)]


_SD = "stable-diffusion-2-1-base/"
CHECKPOINTS: dict[str, Checkpoint] = {
    c.key: c
    for c in (
        Checkpoint("sd21", _SD, "huggingface.co/Manojb/stable-diffusion-2-1-base (mirror of the removed "
                   "stabilityai/stable-diffusion-2-1-base)",
                   ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json",
                    "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
                    "vae/diffusion_pytorch_model.safetensors", "text_encoder/config.json",
                    "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt")),
        Checkpoint("rgb_adapter", "pretrained_models/rgb_adapter.safetensors", "huggingface.co/Co2y/UP2You"),
        Checkpoint("normal_adapter", "pretrained_models/normal_adapter.safetensors", "huggingface.co/Co2y/UP2You"),
        Checkpoint("shape_predictor", "pretrained_models/shape_predictor.pt", "huggingface.co/Co2y/UP2You"),
        Checkpoint("feature_aggregator", "pretrained_models/feature_aggregator.pt", "huggingface.co/Co2y/UP2You"),
        Checkpoint("dinov2", "dinov2/dinov2_vitl14_pretrain.pth",
                   "dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth "
                   "(torch.hub facebookresearch/dinov2, dinov2_vitl14)"),
        Checkpoint("birefnet", "BiRefNet/", "huggingface.co/ZhengPeng7/BiRefNet (the whole repo: code + weights)",
                   ("config.json", "model.safetensors", "birefnet.py", "BiRefNet_config.py")),
        Checkpoint("smplx", "human_models/models/smplx/SMPLX_NEUTRAL.npz",
                   "smpl-x.is.tue.mpg.de (licence required) or huggingface.co/Co2y/UP2You human_models/"),
        Checkpoint("mano_ids", "human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl",
                   "smpl-x.is.tue.mpg.de (MANO_SMPLX_vertex_ids.pkl) or huggingface.co/Co2y/UP2You human_models/"),
        Checkpoint("smplx_lmkid", "human_models/smpl_data/smplx_vertex_lmkid.npy",
                   "huggingface.co/Co2y/UP2You human_models/smpl_data/ (ECON smpl_data)"),
    )
}  # fmt: skip


def resolve(weights_dir: Path | str, key: str) -> Path:
    return Path(weights_dir) / CHECKPOINTS[key].path


def missing(weights_dir: Path | str, keys: tuple[str, ...] | list[str]) -> list[tuple[str, str]]:
    """(missing file, where to get it) for every file the named checkpoints need."""
    out: list[tuple[str, str]] = []
    for k in keys:
        c = CHECKPOINTS[k]
        out += [(m, c.source) for m in c.missing(Path(weights_dir))]
    return out


class MissingWeightsError(FileNotFoundError):
    """Raised by a loader (and by the preflight) when checkpoint files are absent."""

    def __init__(self, items: list[tuple[str, str]]) -> None:
        self.items = items
        first, source = items[0]
        more = f" (and {len(items) - 1} more)" if len(items) > 1 else ""
        super().__init__(f"missing weights: {first}{more} — get it from {source}, or run with --tiny for a smoke test")


class DamagedWeightsError(ValueError):
    """A checkpoint file is there but unusable (truncated, garbage, or a pickle that would run code)."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path, self.problem = str(path), problem
        super().__init__(f"{path} {problem}: refused; get it again from {source_of(path)}")


def source_of(path: Path | str) -> str:
    """Where the checkpoint that `path` belongs to comes from (by its place in the layout)."""
    text = Path(path).as_posix()
    for c in CHECKPOINTS.values():
        if c.path.rstrip("/") in text:
            return c.source
    return "its release (see the README, Weights)"


def damaged(weights_dir: Path | str, keys: tuple[str, ...] | list[str]) -> list[DamagedWeightsError]:
    """Files of the named checkpoints that are present but broken, from their headers (cheap: no tensor is read).

    safetensors: the header must parse and the file must hold every byte it promises. torch .pt/.pth
    (zip): the archive's directory must be whole and its pickle may name only torch/numpy/container
    globals, so a payload that would run code is refused before any process starts (the loaders'
    `weights_only=True` refuses it again in the stage).
    """
    out: list[DamagedWeightsError] = []
    for k in keys:
        c = CHECKPOINTS[k]
        base = Path(weights_dir) / c.path
        files = [base / f for f in c.required_files] if c.path.endswith("/") else [base]
        for f in files:
            problem = file_problem(f) if f.is_file() else None
            if problem:
                out.append(DamagedWeightsError(f, problem))
    return out


def file_problem(path: Path) -> str | None:
    """Why a weight file cannot be what its suffix says, or None."""
    import json
    import zipfile

    size = path.stat().st_size
    if size == 0:
        return "is empty (0 bytes)"
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            return _safetensors_problem(path, size)
        if suffix in (".pt", ".pth", ".npz"):
            if not zipfile.is_zipfile(path):
                return None if suffix != ".npz" and _starts_with(path, b"\x80") else "is truncated or not a zip archive"
            with zipfile.ZipFile(path) as z:
                pickles = [n for n in z.namelist() if n.endswith("data.pkl")]
                for n in pickles:
                    bad = _pickle_globals_problem(z.read(n))
                    if bad:
                        return bad
            return None
        if suffix == ".json":
            json.loads(path.read_text())
        if suffix == ".npy" and not _starts_with(path, b"\x93NUMPY"):
            return "is not a .npy array file"
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        return f"is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'unreadable'})"
    return None


def _starts_with(path: Path, magic: bytes) -> bool:
    with open(path, "rb") as f:
        return f.read(len(magic)) == magic


def _safetensors_problem(path: Path, size: int) -> str | None:
    import json
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return "is truncated (no header)"
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 100 * 2**20):
            return f"is truncated or garbage (its header claims {n} bytes, the file has {size})"
        header = json.loads(f.read(n))
    if not isinstance(header, dict):
        return "is garbage (its header is not a table of tensors)"
    ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    need = 8 + n + max(ends, default=0)
    if size < need:
        return f"is truncated ({size} of {need} bytes)"
    return None


# Globals a torch.save'd state dict may name (torch's own rebuild functions, storages, dtypes, containers).
_SAFE_GLOBAL_MODULES = ("torch", "collections", "numpy", "_codecs")


def _pickle_globals_problem(data: bytes) -> str | None:
    """Walk the pickle's opcodes (never executing them) and refuse any global outside the allowed modules."""
    import pickletools

    strings: list[object] = []
    memo: dict[int, object] = {}
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name == "GLOBAL":
                module, _, attr = str(arg).partition(" ")
            elif name == "STACK_GLOBAL":
                module, attr = (str(x) for x in strings[-2:]) if len(strings) >= 2 else ("?", "?")
            else:
                if "UNICODE" in name or "STRING" in name:
                    strings.append(arg)
                elif name in ("BINPUT", "LONG_BINPUT", "PUT"):
                    memo[int(arg)] = strings[-1] if strings else None
                elif name == "MEMOIZE":
                    memo[len(memo)] = strings[-1] if strings else None
                elif name in ("BINGET", "LONG_BINGET", "GET"):
                    strings.append(memo.get(int(arg)))
                continue
            if module.split(".")[0] not in _SAFE_GLOBAL_MODULES:
                return f"holds a pickle that would call {module}.{attr} (code, not tensors)"
    except Exception as exc:  # noqa: BLE001 - a pickle we cannot walk is not one we load
        return f"holds a pickle that cannot be read ({type(exc).__name__})"
    return None


# ---------------------------------------------------------------------------------------------------
# What the released files must be: size and sha256 as read from Git-LFS pointers or cache blob names.
# Only values actually read are recorded, each with where it was read; None = unknown (not checked).

_HUIHUIYAY = "Git-LFS pointer in github.com/huihuiyay/Up2you @38d7e76 (a copy of Co2y/UP2You)"
_HUIHUIYAY_BIREFNET = ("Git-LFS pointer of models/BiRefNet/model.safetensors in github.com/huihuiyay/Up2you "
                       "@38d7e76 (its 2025-11-17 copy of ZhengPeng7/BiRefNet)")
_SD_BLOBS = ("HF-cache blob name (= sha256) of stabilityai/stable-diffusion-2-1-base, read from the symlinks "
             "committed in github.com/User19779/ZoDiac @549cc54; the Manojb mirror's UNet fp16 blob has the same "
             "sha256 (28ec9cf3...) in a third-party audit of Manojb revision 0094d48")


@dataclass(frozen=True)
class Expected:
    """What one file must be; `None` fields are unknown and not checked."""

    size: int | None
    sha256: str | None
    read_from: str


EXPECTED: dict[str, Expected] = {
    "pretrained_models/rgb_adapter.safetensors": Expected(
        706098256, "95ac50c0f894931b3a55080299b75d762b94b84d669eb9c00309debf6b5dffef", _HUIHUIYAY),
    "pretrained_models/normal_adapter.safetensors": Expected(
        706098256, "ebf7e5886f396649112ac72fe30f59ad047dd469a8c161a90b3ef6bb68df8e50", _HUIHUIYAY),
    "pretrained_models/shape_predictor.pt": Expected(
        417991134, "d43751d389b8bc219c793ded0c524678b89e6dd090c251968a70e8dcd5a81bc9", _HUIHUIYAY),
    "pretrained_models/feature_aggregator.pt": Expected(
        217946530, "9304c06fce5b7734a3e4e536860dc1bad3e65b335672d3057736c7af4025142a", _HUIHUIYAY),
    "human_models/models/smplx/SMPLX_NEUTRAL.npz": Expected(
        108752058, "376021446ddc86e99acacd795182bbef903e61d33b76b9d8b359c2b0865bd992", _HUIHUIYAY),
    "human_models/smpl_data/MANO_SMPLX_vertex_ids.pkl": Expected(
        13535, "e5abe70b6574de25470475091e8008314a5b90127eb48c3e63bfa0adf8c04dcf", _HUIHUIYAY),
    "human_models/smpl_data/smplx_vertex_lmkid.npy": Expected(
        83928, "595933599d6a177adad5d34172432b210e51fbe6ab5a3ba744b87210ce50413d", _HUIHUIYAY),
    "BiRefNet/model.safetensors": Expected(
        444473596, "9ab37426bf4de0567af6b5d21b16151357149139362e6e8992021b8ce356a154", _HUIHUIYAY_BIREFNET),
    _SD + "unet/diffusion_pytorch_model.safetensors": Expected(
        None, "6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214", _SD_BLOBS),
    _SD + "vae/diffusion_pytorch_model.safetensors": Expected(
        None, "a1d993488569e928462932c8c38a0760b874d166399b14414135bd9c42df5815", _SD_BLOBS),
    _SD + "text_encoder/model.safetensors": Expected(
        None, "cce6febb0b6d876ee5eb24af35e27e764eb4f9b1d0b7c026c8c3333d4cfc916c", _SD_BLOBS),
    "dinov2/dinov2_vitl14_pretrain.pth": Expected(
        1217586395, None, "Content-Length of a HEAD on the dl.fbaipublicfiles.com URL, 2026-10-04, recorded in a "
        "third-party repository (no published sha256; 304,368,640 fp32 parameters = 1,217,474,560 bytes + pickle)"),
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Where `weights fetch` downloads each checkpoint from, and under which licence.


@dataclass(frozen=True)
class Licence:
    name: str
    url: str
    needs_acceptance: bool = False  # fetched only with --accept-smplx-license


LICENCES: dict[str, Licence] = {
    "up2you": Licence("not stated by the authors (code MIT; treat the weights as research use only)",
                      "https://huggingface.co/Co2y/UP2You"),
    "sd21": Licence("CreativeML Open RAIL++-M", "https://huggingface.co/stabilityai/stable-diffusion-2-1-base"),
    "dinov2": Licence("Apache-2.0", "https://github.com/facebookresearch/dinov2/blob/main/LICENSE"),
    "birefnet": Licence("MIT", "https://huggingface.co/ZhengPeng7/BiRefNet"),
    "smplx": Licence("SMPL-X model licence (MPI; non-commercial scientific research only)",
                     "https://smpl-x.is.tue.mpg.de/modellicense.html", needs_acceptance=True),
}  # fmt: skip


@dataclass(frozen=True)
class Download:
    """One checkpoint's download: Hugging Face repo files (`repo`) or a plain URL (`url`).

    A repo file `f` lands at `<weights>/<local_dir>/f`, which is where the stages read it.
    """

    key: str
    licence: str
    repo: str = ""
    revision: str | None = None  # None = the repo's main branch
    files: tuple[str, ...] = ()
    local_dir: str = ""
    url: str = ""


UP2YOU_REPO = "Co2y/UP2You"
SD21_REPO = "Manojb/stable-diffusion-2-1-base"
SD21_REVISION = "0094d483a120f3f33dafbd187ea4aa60d10de75c"  # the revision third-party projects pin (2026)
BIREFNET_REPO = "ZhengPeng7/BiRefNet"
DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"

DOWNLOADS: dict[str, Download] = {
    d.key: d
    for d in (
        Download("sd21", "sd21", SD21_REPO, SD21_REVISION, CHECKPOINTS["sd21"].required_files +
                 ("tokenizer/tokenizer_config.json", "tokenizer/special_tokens_map.json"), _SD.rstrip("/")),
        *(Download(k, "up2you", UP2YOU_REPO, files=(CHECKPOINTS[k].path,))
          for k in ("rgb_adapter", "normal_adapter", "shape_predictor", "feature_aggregator")),
        Download("dinov2", "dinov2", url=DINOV2_URL),
        Download("birefnet", "birefnet", BIREFNET_REPO, None, CHECKPOINTS["birefnet"].required_files,
                 CHECKPOINTS["birefnet"].path.rstrip("/")),
        *(Download(k, "smplx", UP2YOU_REPO, files=(CHECKPOINTS[k].path,)) for k in ("smplx", "mano_ids", "smplx_lmkid")),
    )
}  # fmt: skip


def files_of(key: str) -> list[str]:
    """Every file of a checkpoint, relative to the weights folder."""
    c = CHECKPOINTS[key]
    if c.path.endswith("/"):
        return [c.path + f for f in c.required_files]
    return [c.path]
