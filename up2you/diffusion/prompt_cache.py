"""The prompt embeddings of a stage, kept on disk between jobs.

A stage's prompts are fixed (`RGB_PROMPT`, `NORMAL_PROMPT` and the empty one), so their CLIP embeddings
depend only on the text encoder's and tokenizer's files and on the machine that computes them. The first
job computes them exactly as before (the encoder on the device, in the compute dtype) and stores the
result; a later job with the same files, dtype, device model and library versions reads the same bits
back and leaves the encoder in host memory (0.5-1.2 s a diffusion stage on the lent H200, 2026-12-03).
Anything that could change a bit is in the key; a file that cannot be read is a miss, never an error.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from up2you.buildcache import cache_dir


def default_folder() -> Path:
    return cache_dir() / "prompt_embeddings"


def text_files(sd_folder: Path) -> tuple[Path, ...]:
    """The files of an SD 2.1 folder that prompt embeddings depend on: the text encoder and the tokenizer."""
    return tuple(sorted(p for sub in ("text_encoder", "tokenizer") for p in (sd_folder / sub).glob("*") if p.is_file()))


def device_identity(device: torch.device) -> dict[str, str]:
    """What decides the kernels, and so the bits, of the encoder's forward on `device`."""
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return {"device": props.name, "capability": f"{props.major}.{props.minor}", "cuda": str(torch.version.cuda)}
    return {"device": platform.machine(), "cpu": torch.backends.cpu.get_cpu_capability()}


@dataclass(frozen=True)
class PromptCache:
    """Embeddings by key in `folder`, one safetensors file each (written atomically)."""

    folder: Path

    @classmethod
    def default(cls) -> PromptCache:
        return cls(default_folder())

    def key(self, prompts: Sequence[str], files: Sequence[Path], dtype: torch.dtype, device: torch.device) -> str:
        import transformers

        stats = [(str(p.resolve()), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
        ident = {"prompts": list(prompts), "files": stats, "dtype": str(dtype), "torch": torch.__version__,
                 "transformers": transformers.__version__, **device_identity(device)}  # fmt: skip
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.folder / f"{key}.safetensors"

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(conditional, unconditional) embeddings, or None: absent, cut short or unreadable."""
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(self.path(key)))
            return tensors["cond"], tensors["uncond"]
        except Exception:  # compute them again
            return None

    def store(self, key: str, cond: torch.Tensor, uncond: torch.Tensor) -> None:
        """Write them (best effort: a full disk or a read-only cache only costs the next job the encoding)."""
        from safetensors.torch import save_file

        target = self.path(key)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            self.folder.mkdir(parents=True, exist_ok=True)
            save_file({"cond": cond.detach().cpu().contiguous(), "uncond": uncond.detach().cpu().contiguous()}, str(tmp))
            os.replace(tmp, target)
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
