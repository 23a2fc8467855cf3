"""Tiny random checkpoints in the released layout, for tests and the `--tiny` smoke profile.

Each model family writes its own files with the real on-disk format (same key names, file names
and folder layout as the released weights, small widths), so the real loading code is what runs.
"""

from __future__ import annotations

from pathlib import Path


def write_tiny_weights(weights_dir: Path | str, seed: int = 0) -> Path:
    """Write every checkpoint of up2you.checkpoints.CHECKPOINTS, tiny and random, under weights_dir."""
    from up2you.diffusion.tiny import write_tiny_diffusion
    from up2you.encoders.tiny import write_tiny_encoders
    from up2you.geometry.tiny import write_tiny_body_model

    root = Path(weights_dir)
    root.mkdir(parents=True, exist_ok=True)
    write_tiny_encoders(root, seed)  # BiRefNet/, dinov2/, shape_predictor.pt, feature_aggregator.pt
    write_tiny_diffusion(root, seed)  # stable-diffusion-2-1-base/, rgb_adapter / normal_adapter
    write_tiny_body_model(root, seed)  # human_models/...
    (root / ".tiny").write_text("tiny random weights: a smoke test, not a reconstruction\n")
    return root


if __name__ == "__main__":  # `python -m up2you.tiny DIR`: the orchestrator's way to make them without importing torch
    import sys

    print(write_tiny_weights(sys.argv[1]))
