"""Loading the body-model assets a stage needs, for every profile.

`real` and `tiny` read the released files from the weights folder (the same code path); the
`full-random` calibration profile has no files and uses the synthetic body of `geometry.tiny`, which
has SMPL-X's vertex count, so memory measured with it transfers to the real model.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from up2you.geometry.body import load_smplx
from up2you.geometry.safe_pickle import load_numpy_pickle


def body_model(ckpt: Any, profile: str) -> torch.nn.Module:
    """smplx.SMPLX for the profile; `ckpt` is the stage context's ctx.ckpt."""
    if profile == "full-random":
        from up2you.geometry.tiny import write_tiny_body_model

        with tempfile.TemporaryDirectory() as tmp:
            write_tiny_body_model(tmp)
            from up2you.checkpoints import resolve

            return load_smplx(resolve(tmp, "smplx"))
    return load_smplx(ckpt("smplx"))


def hand_assets(ckpt: Any, profile: str) -> tuple[np.ndarray, np.ndarray]:
    """(hand vertex ids of both hands, per-vertex landmark ids) of the SMPL-X topology."""
    if profile == "full-random":
        from up2you.geometry.tiny import synthetic_body

        _, hands, lmk = synthetic_body()
    else:
        hands = load_numpy_pickle(Path(ckpt("mano_ids")))
        lmk = np.load(ckpt("smplx_lmkid"), allow_pickle=False)
    ids = np.concatenate([np.asarray(hands["left_hand"]), np.asarray(hands["right_hand"])]).astype(np.int64)
    return ids, np.asarray(lmk).astype(np.int64).reshape(-1)
