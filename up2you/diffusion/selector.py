"""Top-K reference token selection (upstream `FeatureSelector`, mode "topk"; fact sheet §4.3).

Each target view attends to a fixed number of reference tokens, k = min(2, Nr) * H * W, whatever the
number of photos Nr: the view's weight maps (Nr, 37, 37) are resized to the layer's grid (bilinear,
align_corners=True), the k largest weights over all Nr*H*W tokens are chosen, their indices sorted
back to (ref, row, col) order, and each chosen token is multiplied by its weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

MAX_SELECT_RATIO = 2.0


def select_topk(
    feats: torch.Tensor, weight_maps: torch.Tensor, ratio: float = MAX_SELECT_RATIO
) -> torch.Tensor:
    """feats (Nr, H*W, C) of one layer; weight_maps (N, Nr, h, w) -> selected tokens (N, k, C).

    Views are processed one at a time, so the transient is one view's Nr*H*W weights.
    """
    nr, hw, c = feats.shape
    side = int(round(hw**0.5))
    k = int(min(ratio, nr) * hw)
    flat = feats.reshape(nr * hw, c)
    out = feats.new_empty(weight_maps.shape[0], k, c)
    for v in range(weight_maps.shape[0]):
        w = weight_maps[v].to(device=feats.device, dtype=feats.dtype).unsqueeze(1)  # upstream casts first
        w = F.interpolate(w, size=(side, side), mode="bilinear", align_corners=True).reshape(-1)
        idx = torch.topk(w, k=k).indices.sort().values
        out[v] = flat[idx] * w[idx].unsqueeze(-1)
    return out
