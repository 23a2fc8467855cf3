"""The attn1 processor of UP2You: self-attention + multi-view row attention + reference attention.

One processor sits on each of the 16 self-attention (attn1) layers of the SD 2.1 UNet. Its ten
parameters (`to_{q,k,v}_{mv,ref}`, `to_out_{mv,ref}.0`) are named as in the released adapters, so the
UNet state dict exposes them as `<block>.attn1.processor.to_q_mv.weight`, ... (fact sheet §4.5-4.6).

Memory-lean, exact rewrites of the upstream processor:
- row attention uses ONE key set per (sample, row): the N*W queries of a row are the same sequence as
  its N*W keys, so a single SDPA over (sample, row) replaces upstream's N-fold `repeat_interleave` of
  the keys (O(N) instead of O(N^2) memory, bit-identical per query);
- the reference cache holds only the conditional half: the unconditional half used zero reference
  states, and SDPA over zero keys/values gives exactly 0, so its reference output is `to_out_ref`'s bias;
- the cache is written without a clone, and only by attn1 (attn2 keeps diffusers' plain processor).

The processors take no per-call kwargs: they read one shared `AttentionContext`, which the sampler
sets before each UNet call (capture mode for the reference pass, or denoise mode with `n_uncond`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from up2you.meta_init import is_meta

ATTN1_SUFFIX = ".attn1"
PROCESSOR_PARAMS = ("to_q_mv", "to_k_mv", "to_v_mv", "to_out_mv", "to_q_ref", "to_k_ref", "to_v_ref", "to_out_ref")


@dataclass
class AttentionContext:
    """State shared by all attn1 processors for the next UNet call.

    capture: when not None, each processor stores its (normed) input under its layer name and runs
        plain self-attention only (the reference-UNet pass: no multi-view, no reference attention).
    ref: per-layer reference states of the conditional samples, (n_cond, T, C); may live on the CPU
        (pinned) and is then copied to the device layer by layer.
    n_uncond: the first n_uncond samples of the batch are unconditional (zero reference states).
    num_views: views per sample (the row attention groups the batch by sample).
    """

    num_views: int = 1
    capture: dict[str, list[torch.Tensor]] | None = None
    ref: dict[str, torch.Tensor] = field(default_factory=dict)
    n_uncond: int = 0


def row_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_views: int, heads: int) -> torch.Tensor:
    """Multi-view row attention with one shared key set per (sample, row).

    q, k, v: (B*N, H*W, C) with H == W. Token (view n, row r, col c) attends to row r of all N views of
    its sample. Grouping the batch as (B, H) sequences of length N*W makes queries and keys the same
    sequence, so no key is copied. Returns (B*N, H*W, C).
    """
    bn, hw, c = q.shape
    side = int(round(hw**0.5))
    b, d = bn // num_views, c // heads

    def rows(x: torch.Tensor) -> torch.Tensor:  # (B*N, H*W, C) -> (B*H, heads, N*W, d)
        x = x.view(b, num_views, side, side, heads, d).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(b * side, heads, num_views * side, d)

    out = F.scaled_dot_product_attention(rows(q), rows(k), rows(v))
    out = out.view(b, side, heads, num_views, side, d).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(bn, hw, c)


def _heads_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Plain multi-head SDPA on (B, L, C) tensors."""
    b, lq, c = q.shape
    d = c // heads

    def split(x: torch.Tensor) -> torch.Tensor:
        return x.view(x.shape[0], -1, heads, d).transpose(1, 2)

    out = F.scaled_dot_product_attention(split(q), split(k), split(v))
    return out.transpose(1, 2).reshape(b, lq, c)


class MVRefAttnProcessor(nn.Module):
    """UP2You's decoupled attn1 processor (upstream `DecoupledMVRowSelfAttnProcessor2_0`, use_mv and
    use_ref on), rewritten for memory; see the module docstring."""

    def __init__(self, dim: int, name: str, context: AttentionContext) -> None:
        super().__init__()
        self.name = name
        self.context = context  # shared, not a submodule: no parameters, not in the state dict
        self.to_q_mv = nn.Linear(dim, dim, bias=False)
        self.to_k_mv = nn.Linear(dim, dim, bias=False)
        self.to_v_mv = nn.Linear(dim, dim, bias=False)
        self.to_out_mv = nn.ModuleList([nn.Linear(dim, dim, bias=True), nn.Dropout(0.0)])
        self.to_q_ref = nn.Linear(dim, dim, bias=False)
        self.to_k_ref = nn.Linear(dim, dim, bias=False)
        self.to_v_ref = nn.Linear(dim, dim, bias=False)
        self.to_out_ref = nn.ModuleList([nn.Linear(dim, dim, bias=True), nn.Dropout(0.0)])

    def __call__(  # type: ignore[override]
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        ctx = self.context
        x = hidden_states  # (B, HW, C): the block's norm1 output, never mutated afterwards
        heads = attn.heads
        if ctx.capture is not None:  # reference pass: keep the input (no clone), plain self-attention
            ctx.capture.setdefault(self.name, []).append(x)
        out = _heads_sdpa(attn.to_q(x), attn.to_k(x), attn.to_v(x), heads)
        out = attn.to_out[1](attn.to_out[0](out))
        if ctx.capture is None:
            mv = row_attention(self.to_q_mv(x), self.to_k_mv(x), self.to_v_mv(x), ctx.num_views, heads)
            out = out + self.to_out_mv[0](mv)
            self._add_reference(out, x, heads)
        if attn.residual_connection:
            out = out + hidden_states
        return out / attn.rescale_output_factor

    def _add_reference(self, out: torch.Tensor, x: torch.Tensor, heads: int) -> None:
        """Add the reference attention in place; the unconditional rows get `to_out_ref`'s bias, which is
        their exact output (SDPA over zero keys is a uniform average of zero values)."""
        ctx = self.context
        n_u = ctx.n_uncond
        if n_u:
            out[:n_u] += self.to_out_ref[0].bias
        if n_u == x.shape[0]:
            return
        ref = ctx.ref[self.name].to(device=x.device, dtype=x.dtype, non_blocking=True)
        xc = x[n_u:]
        cond = _heads_sdpa(self.to_q_ref(xc), self.to_k_ref(ref), self.to_v_ref(ref), heads)
        out[n_u:] += self.to_out_ref[0](cond)


def install_processors(unet: nn.Module, context: AttentionContext) -> dict[str, MVRefAttnProcessor]:
    """Put an MVRefAttnProcessor on every attn1 of the UNet; attn2 keeps its parameter-free processor.

    Returns the processors by layer name (the module path of the attn1 layer).
    """
    from diffusers.models.attention_processor import Attention

    procs: dict[str, MVRefAttnProcessor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, Attention) and name.endswith(ATTN1_SUFFIX):
            dim = module.to_q.in_features
            proc = MVRefAttnProcessor(dim, name, context)
            if not is_meta(proc):  # on meta, the load gives them their values
                proc.to(device=module.to_q.weight.device, dtype=module.to_q.weight.dtype)
            module.set_processor(proc)
            procs[name] = proc
    return procs
