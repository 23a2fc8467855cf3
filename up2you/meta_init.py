"""Full-size models with random weights in about a second: build on `meta`, fill cheaply later.

Profile `full-random` exists to measure memory and time of the real architectures without any file.
Default initialisation (kaiming/xavier per layer on the CPU) costs ~34 s for SD 2.1 and buys nothing:
memory does not depend on the values. So the builders construct parameters on the `meta` device
(shape only, no storage, no init math) and `materialize` gives each parameter storage on the target
device and a cheap deterministic fill: a seeded N(0, 0.02) block tiled over the tensor (a copy, not a
random draw per element), biases 0, norm weights 1. Buffers are built normally (they are small and
some carry values that matter, e.g. CLIP's `position_ids`), which is why this patches parameter
registration instead of using `torch.device("meta")` + `Module.to_empty` (that would wipe buffers).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

_BLOCK = 1 << 20  # values in the tiled random block: 4 MiB in fp32, period long enough to look random
_NORMS = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d, nn.BatchNorm1d)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Inside this block every parameter registered on a module lives on `meta` (buffers stay real)."""
    original = nn.Module.register_parameter

    def register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            assert p is not None
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register  # type: ignore[method-assign]
    try:
        yield
    finally:
        nn.Module.register_parameter = original  # type: ignore[method-assign]


def is_meta(module: nn.Module) -> bool:
    return any(p.device.type == "meta" for p in module.parameters())


@torch.no_grad()
def materialize(module: nn.Module, device: torch.device | str = "cpu", seed: int = 0, std: float = 0.02,
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Give every `meta` parameter storage on `device` and a deterministic cheap fill; returns `module`.

    All of them become views of ONE flat buffer filled by a single tiled copy: thousands of separate
    allocations cost a page fault per 4 KiB (16 s for SD 2.1 in fp16 on a small VM), one large one is
    backed by huge pages. Parameters already materialised are left alone (calling it twice is harmless).
    """
    device = torch.device(device)
    norm_params = {id(p) for m in module.modules() if isinstance(m, _NORMS) for p in m.parameters(recurse=False)}
    todo: dict[int, tuple[nn.Parameter, str]] = {}  # id -> (meta parameter, its name); tied ones once
    for mod in module.modules():
        for name, p in mod._parameters.items():
            if p is not None and p.device.type == "meta":
                todo.setdefault(id(p), (p, name))
    if not todo:
        return module
    flat = torch.empty(sum(p.numel() for p, _ in todo.values()), device=device, dtype=dtype)
    gen = torch.Generator(device).manual_seed(seed)
    _tile(flat, torch.empty(_BLOCK, device=device, dtype=dtype).normal_(0.0, std, generator=gen))
    new: dict[int, nn.Parameter] = {}
    offset = 0
    for key, (p, name) in todo.items():
        data = flat[offset:offset + p.numel()].view(p.shape)
        offset += p.numel()
        if key in norm_params:
            data.fill_(1.0 if name == "weight" else 0.0)
        elif name.endswith("bias"):
            data.zero_()
        new[key] = nn.Parameter(data, requires_grad=p.requires_grad)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in new:
                mod._parameters[name] = new[id(p)]
    return module


def _tile(out: torch.Tensor, block: torch.Tensor) -> None:
    """Fill `out` with `block` repeated (the last piece cut short): memory bandwidth, not RNG."""
    flat = out.view(-1)
    n, b = flat.numel(), block.numel()
    full = n // b
    if full:
        flat[: full * b].view(full, b).copy_(block.expand(full, b))
    rest = n - full * b
    if rest:
        flat[full * b:].copy_(block[:rest])


@torch.no_grad()
def random_module(build: Callable[[], nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32) -> nn.Module:
    """`build()` on `meta`, then filled cheaply (as `materialize`), each parameter in its OWN storage.

    For writers of full-size checkpoint files: safetensors refuses tensors that share a storage, and a
    released file has one storage per tensor. Costs one extra copy of the weights while it runs.
    """
    with meta_parameters():
        module = build()
    materialize(module, "cpu", seed=seed, dtype=dtype)
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None:
                mod._parameters[name] = nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad)
    return module
