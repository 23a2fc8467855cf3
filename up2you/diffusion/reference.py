"""Upstream UP2You's multi-view row attention layout, kept only to test and measure our rewrite against.

Upstream builds each query row's keys by `repeat_interleave`-ing the whole row set of all N views N times:
O(N^2) memory (9 GiB for one 96^2 layer at 20 views with CFG). `processors.row_attention` computes the same
result with one shared key set per (sample, row).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def upstream_row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, n: int, heads: int) -> torch.Tensor:
    """Queries per (sample, view, row); the row's N*W keys repeated N times. q, k, v: (B*N, H*W, C)."""
    bn, hw, c = q.shape
    side, d, b = math.isqrt(hw), c // heads, bn // n
    qr = q.view(b, n, side, side, heads, d).reshape(b * n * side, side, heads, d).transpose(1, 2)

    def keys(x: torch.Tensor) -> torch.Tensor:
        x = x.view(b, n, side, side, heads, d).permute(0, 2, 1, 3, 4, 5).reshape(b, side, n * side, heads, d)
        return x.repeat_interleave(n, dim=0).view(b * n * side, n * side, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(qr, keys(k), keys(v))
    return out.transpose(1, 2).reshape(bn, hw, c)
