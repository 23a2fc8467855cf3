"""Full-size random checkpoints in the exact released layout, written once into a folder the user names.

Profile `full-random` builds the models on `meta` and never reads a file, so it cannot show what a user
pays at start-up (reading ~9 GB of safetensors/.pth files through the strict loaders). This writes
files a run with profile `real` and `--weights DIR` loads like the released ones: SD 2.1 base
(diffusers folder, fp32), both adapter files (198 keys each), shape_predictor.pt, feature_aggregator.pt,
DINOv2 ViT-L/14 .pth, a BiRefNet-shaped repository folder (fp16) and the SMPL-X-shaped body files.
It is the tiny writers (up2you.{diffusion,encoders,geometry}.tiny) at full-size configs, with the cheap
tiled fill of up2you.meta_init. A marker file records the writer's version and size: when it matches,
nothing is rewritten.

    python -m up2you.fullsize DIR [--divisor D]     (D > 1: every width divided by D, for tests)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from up2you.checkpoints import STAND_IN_MARKER as MARKER

WRITER_VERSION = 1
DIVISORS = (1, 2, 4, 8, 16)  # widths stay divisible by SD's 32 norm groups / d and its 64-wide heads / d


@dataclass(frozen=True)
class FullSizes:
    """Every model's configuration at full size (divisor 1) or with all widths divided (a test)."""

    divisor: int = 1

    def __post_init__(self) -> None:
        if self.divisor not in DIVISORS:
            raise ValueError(f"divisor {self.divisor}: expected one of {DIVISORS}")

    def _w(self, width: int) -> int:
        return width // self.divisor

    def _depth(self, depth: int) -> int:
        return max(1, depth // self.divisor)

    @property
    def unet(self) -> dict[str, Any]:
        from up2you.diffusion.models import UNET_FULL

        # heads stay 5/10/20/20 (diffusers reads attention_head_dim as the head count here): 64/d wide
        return {**UNET_FULL, "block_out_channels": tuple(map(self._w, UNET_FULL["block_out_channels"])),
                "cross_attention_dim": self._w(UNET_FULL["cross_attention_dim"]), "norm_num_groups": 32 // self.divisor}

    @property
    def vae(self) -> dict[str, Any]:
        from up2you.diffusion.models import VAE_FULL

        return {**VAE_FULL, "block_out_channels": tuple(map(self._w, VAE_FULL["block_out_channels"])),
                "norm_num_groups": 32 // self.divisor}

    @property
    def text(self) -> dict[str, Any]:
        """CLIPTextConfig fields less the vocabulary ones (the tokenizer, padded to 49408, supplies them)."""
        from up2you.diffusion.models import TEXT_FULL

        t = {k: v for k, v in TEXT_FULL.items() if k not in ("vocab_size", "bos_token_id", "eos_token_id",
                                                                "pad_token_id")}  # fmt: skip
        return {**t, "hidden_size": self._w(t["hidden_size"]), "intermediate_size": self._w(t["intermediate_size"]),
                "num_attention_heads": max(1, t["num_attention_heads"] // self.divisor),
                "num_hidden_layers": self._depth(t["num_hidden_layers"]), "projection_dim": self._w(t["projection_dim"])}

    @property
    def vocab_size(self) -> int:
        from up2you.diffusion.models import TEXT_FULL

        return int(TEXT_FULL["vocab_size"])

    @property
    def encoders(self) -> Any:
        from up2you.encoders.feature_aggregator import POSE_WIDTHS
        from up2you.encoders.tiny import BIREFNET_FULL, EncoderSizes

        b = BIREFNET_FULL
        birefnet = {"widths": tuple(map(self._w, b["widths"])), "depths": tuple(map(self._depth, b["depths"])),
                    "mlp_ratio": b["mlp_ratio"]}  # fmt: skip
        return EncoderSizes(dim=self._w(1024), dinov2_depth=self._depth(24), pose_widths=tuple(map(self._w, POSE_WIDTHS)),
                            birefnet=birefnet)  # fmt: skip


def marker_record(divisor: int = 1, seed: int = 0) -> dict[str, Any]:
    return {"writer": "up2you.fullsize", "version": WRITER_VERSION, "divisor": divisor, "seed": seed}


def is_written(root: Path | str, divisor: int = 1, seed: int = 0) -> bool:
    """True when `root` holds a complete set from this writer version at this size (torch-free)."""
    marker = Path(root) / MARKER
    try:
        return json.loads(marker.read_text()) == marker_record(divisor, seed)
    except (OSError, ValueError):
        return False


def write_full_weights(root: Path | str, divisor: int = 1, seed: int = 0) -> Path:
    """Write (or keep, when the marker matches) every checkpoint of up2you.checkpoints under `root`."""
    root = Path(root)
    if is_written(root, divisor, seed):
        return root
    from up2you.diffusion.tiny import write_diffusion
    from up2you.encoders.tiny import write_tiny_encoders
    from up2you.geometry.tiny import write_tiny_body_model

    sizes = FullSizes(divisor)
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).unlink(missing_ok=True)  # written last: its presence means "complete"
    for stale in ("stable-diffusion-2-1-base", "BiRefNet"):  # a half-written earlier set
        shutil.rmtree(root / stale, ignore_errors=True)
    write_tiny_encoders(root, seed, sizes.encoders, fast=True)
    write_diffusion(root, seed, sizes.unet, sizes.vae, sizes.text, vocab_size=sizes.vocab_size, fast=True)
    write_tiny_body_model(root, seed)  # the synthetic body has SMPL-X's 10475 vertices at every size
    (root / ".tiny").unlink(missing_ok=True)  # not a smoke-test set
    (root / MARKER).write_text(json.dumps(marker_record(divisor, seed)) + "\n")
    return root


def folder_bytes(root: Path | str) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(prog="python -m up2you.fullsize", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    ap.add_argument("dir", type=Path)
    ap.add_argument("--divisor", type=int, default=1, choices=DIVISORS)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    t = time.time()
    kept = is_written(args.dir, args.divisor, args.seed)
    write_full_weights(args.dir, args.divisor, args.seed)
    verb = "kept" if kept else "wrote"
    print(f"{verb} {folder_bytes(args.dir) / 1e9:.2f} GB of full-size random weights in {args.dir} "
          f"({time.time() - t:.1f} s)", flush=True)  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
