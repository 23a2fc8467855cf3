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
