"""Where each released checkpoint lives inside `--weights DIR`, and where to get it.

The layout follows upstream UP2You (`pretrained_models/`, `human_models/` as in `Co2y/UP2You`)
plus one folder per third-party model in its own released layout. Torch-free: the orchestrator
checks for missing files before it starts a single process.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
                   ("config.json", "model.safetensors")),
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
