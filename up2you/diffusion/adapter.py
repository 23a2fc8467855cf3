"""The released adapter file (`rgb_adapter.safetensors` / `normal_adapter.safetensors`), loaded strictly.

The file is flat: the 160 attn1 processor weights under their UNet paths
(`<block>.transformer_blocks.0.attn1.processor.to_q_mv.weight`, ...) plus the 38 keys of the T2I pose
adapter (`adapter.conv_in.weight`, ...): 198 keys (fact sheet §4.6). Upstream loads it with
`strict=False`, which would silently keep random weights for a misnamed key; `AdapterBundle` mounts the
very same parameter objects under exactly those names, so `strict_load` proves every key lands.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from up2you.diffusion.processors import MVRefAttnProcessor
from up2you.meta_init import is_meta
from up2you.state_dict import assign_load, read_state_dict, strict_load

N_PROCESSOR_KEYS = 160
N_ADAPTER_KEYS = 38


def build_pose_adapter(block_out_channels: tuple[int, ...], layers_per_block: int) -> nn.Module:
    """The T2I-Adapter ("full_adapter") UP2You conditions on the A-pose normal map (3 channels, /8)."""
    from diffusers import T2IAdapter

    return T2IAdapter(
        in_channels=3,
        channels=list(block_out_channels),
        num_res_blocks=layers_per_block,
        downscale_factor=8,
        adapter_type="full_adapter",
    )


class AdapterBundle(nn.Module):
    """A view whose state dict is exactly the released file: the processors at their UNet paths and the
    T2I adapter's body at `adapter`. It shares parameters with the UNet and the adapter (no copies)."""

    def __init__(self, processors: dict[str, MVRefAttnProcessor], pose_adapter: nn.Module) -> None:
        super().__init__()
        for path, proc in processors.items():
            parent: nn.Module = self
            for part in path.split("."):
                if part not in parent._modules:
                    parent.add_module(part, nn.Module())
                parent = parent._modules[part]  # type: ignore[assignment]
            parent.add_module("processor", proc)
        self.add_module("adapter", pose_adapter.adapter)

    def load_file(self, path: Path | str) -> None:
        """Strictly load a released adapter file (raises CheckpointMismatchError naming bad keys); built on
        `meta`, the file's tensors become the parameters (shared with the UNet's processors and the adapter)."""
        (assign_load if is_meta(self) else strict_load)(self, read_state_dict(path), str(path))

    def save_file(self, path: Path | str) -> None:
        from safetensors.torch import save_file

        save_file({k: v.detach().float().cpu().contiguous() for k, v in self.state_dict().items()}, str(path))


def expected_keys(block_out_channels: tuple[int, ...]) -> dict[str, tuple[int, ...]]:
    """The 198 key names and shapes of a released adapter file, written down from the fact sheet (§4.6)
    for SD 2.1's layout (3 cross-attn down blocks x 2, mid x 1, 3 cross-attn up blocks x 3)."""
    c = block_out_channels
    layers = [(f"down_blocks.{b}.attentions.{a}", c[b]) for b in range(3) for a in range(2)]
    layers += [("mid_block.attentions.0", c[-1])]
    layers += [(f"up_blocks.{b}.attentions.{a}", c[3 - b]) for b in (1, 2, 3) for a in range(3)]
    keys: dict[str, tuple[int, ...]] = {}
    for prefix, dim in layers:
        p = f"{prefix}.transformer_blocks.0.attn1.processor"
        for kind in ("mv", "ref"):
            for proj in ("q", "k", "v"):
                keys[f"{p}.to_{proj}_{kind}.weight"] = (dim, dim)
            keys[f"{p}.to_out_{kind}.0.weight"] = (dim, dim)
            keys[f"{p}.to_out_{kind}.0.bias"] = (dim,)
    keys["adapter.conv_in.weight"] = (c[0], 3 * 64, 3, 3)
    keys["adapter.conv_in.bias"] = (c[0],)
    for b, ch in enumerate(c):
        for r in range(2):
            keys[f"adapter.body.{b}.resnets.{r}.block1.weight"] = (ch, ch, 3, 3)
            keys[f"adapter.body.{b}.resnets.{r}.block1.bias"] = (ch,)
            keys[f"adapter.body.{b}.resnets.{r}.block2.weight"] = (ch, ch, 1, 1)
            keys[f"adapter.body.{b}.resnets.{r}.block2.bias"] = (ch,)
        if b > 0 and c[b - 1] != ch:
            keys[f"adapter.body.{b}.in_conv.weight"] = (ch, c[b - 1], 1, 1)
            keys[f"adapter.body.{b}.in_conv.bias"] = (ch,)
    return keys


def tensor_bytes(bundle: AdapterBundle, dtype: torch.dtype = torch.float32) -> int:
    """Bytes of the bundle's parameters at `dtype` (for the budget table)."""
    return sum(p.numel() for p in bundle.parameters()) * torch.finfo(dtype).bits // 8
