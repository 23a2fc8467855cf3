"""Transformer blocks shared by DINOv2, the shape predictor and the feature aggregator.

Module and parameter names follow the released checkpoints (DINOv2's and UP2You's, which share the
DINOv2 layout): `norm1, attn.qkv | attn.q_proj + attn.kv_proj, attn.q_norm, attn.k_norm, attn.proj,
ls1.gamma, norm2, mlp.fc1, mlp.fc2, ls2.gamma`. Attention goes through SDPA, which never materialises
the score matrix on CUDA (mem-efficient / flash kernels); dropout and drop-path are inference no-ops
and are left out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LayerScale(nn.Module):
    """Per-channel residual scale (`gamma`), as in CaiT / DINOv2."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """fc1 -> GELU (exact) -> fc2."""

    def __init__(self, in_features: int, hidden_features: int, out_features: int | None = None,
                 bias: bool = True) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features, bias=bias)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


def _qk_norm(head_dim: int, enabled: bool) -> nn.Module:
    return nn.LayerNorm(head_dim) if enabled else nn.Identity()


class _HeadedAttention(nn.Module):
    """What self- and cross-attention share: heads, optional per-head q/k LayerNorm, output projection."""

    def __init__(self, dim: int, num_heads: int, proj_bias: bool, qk_norm: bool) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.q_norm = _qk_norm(self.head_dim, qk_norm)
        self.k_norm = _qk_norm(self.head_dim, qk_norm)
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q (B,H,N,D), k/v (B,H,M,D) -> projected (B,N,C)."""
        b, _, n, _ = q.shape
        out = F.scaled_dot_product_attention(self.q_norm(q), self.k_norm(k), v)
        return self.proj(out.transpose(1, 2).reshape(b, n, self.num_heads * self.head_dim))


class Attention(_HeadedAttention):
    """Multi-head self-attention with a fused `qkv` projection and optional per-head q/k LayerNorm."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False) -> None:
        super().__init__(dim, num_heads, proj_bias, qk_norm)
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._attend(q, k, v)


class CrossAttention(_HeadedAttention):
    """Queries from `x`, keys and values from `context` (`q_proj` and a fused `kv_proj`)."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True,
                 qk_norm: bool = False) -> None:
        super().__init__(dim, num_heads, proj_bias, qk_norm)
        self.q_proj = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv_proj = nn.Linear(dim, 2 * dim, bias=qkv_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        m = context.shape[1]
        q = self.q_proj(x).reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv_proj(context).reshape(b, m, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self._attend(q, k, v)


class _PreNormBlock(nn.Module):
    """Pre-LN residual block: x + ls1(attn(norm1 x)); x + ls2(mlp(norm2 x))."""

    def __init__(self, attn: nn.Module, dim: int, mlp_ratio: float, init_values: float | None,
                 norm_eps: float, ffn_bias: bool) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = attn
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), bias=ffn_bias)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()


class SelfAttnBlock(_PreNormBlock):
    """Self-attention block. DINOv2 uses norm_eps=1e-6, init_values=1.0; UP2You's heads 1e-5, 0.01."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 init_values: float | None = None, norm_eps: float = 1e-5) -> None:
        attn = Attention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        super().__init__(attn, dim, mlp_ratio, init_values, norm_eps, ffn_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x)))
        return x + self.ls2(self.mlp(self.norm2(x)))


class CrossAttnBlock(_PreNormBlock):
    """Cross-attention block: tokens attend to an un-normalised context (DINO tokens)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 proj_bias: bool = True, ffn_bias: bool = True, qk_norm: bool = False,
                 init_values: float | None = None, norm_eps: float = 1e-5) -> None:
        attn = CrossAttention(dim, num_heads, qkv_bias=qkv_bias, proj_bias=proj_bias, qk_norm=qk_norm)
        super().__init__(attn, dim, mlp_ratio, init_values, norm_eps, ffn_bias)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), context))
        return x + self.ls2(self.mlp(self.norm2(x)))


def count_blocks(state_dict_keys: list[str] | set[str], prefix: str) -> int:
    """Number of `prefix{i}.` blocks in a checkpoint: how loaders infer depth from the file."""
    ids = {int(k[len(prefix):].split(".", 1)[0]) for k in state_dict_keys
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    if ids and ids != set(range(len(ids))):
        raise ValueError(f"non-contiguous block indices under {prefix!r}: {sorted(ids)}")
    return len(ids)
