"""Memory sizes and durations as people type them, and as we print them.

`12GB` means 12 x 2^30 bytes, like nvidia-smi and every GPU spec sheet a user compares against: a
"12 GB card" holds 12 GiB. GB/GiB/G, MB/MiB/M and plain bytes are accepted, case-insensitively.
"""

from __future__ import annotations

import re

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 2**10, "kib": 2**10, "m": 2**20, "mb": 2**20, "mib": 2**20,
          "g": 2**30, "gb": 2**30, "gib": 2**30, "t": 2**40, "tb": 2**40, "tib": 2**40}  # fmt: skip
_SIZE = re.compile(r"^\s*([-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?)\s*([a-zA-Z]*)\s*$")
MAX_SIZE = 2**44  # 16 TiB: far above any GPU (the largest hold a few hundred GB); above is a typo
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|)\s*$")


def parse_size(text: str) -> int:
    """Bytes in a size like `12GB`, `11.5GiB`, `800M`; raises ValueError with an example otherwise."""
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"{text!r} is not a memory size; write it like 12GB, 11.5GiB or 800MB (GB = 2^30 bytes)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ValueError(f"{text!r}: unknown unit {m.group(2)!r}; write it like 12GB, 11.5GiB or 800MB "
                         "(units: GB/GiB/G, MB/MiB/M, TB)")  # fmt: skip
    value = float(m.group(1)) * _UNITS[unit]
    if not value > 0:  # also NaN
        raise ValueError(f"{text!r}: a memory size must be positive, like 12GB")
    if value > MAX_SIZE:
        raise ValueError(f"{text!r} is more memory than any GPU has (limit {MAX_SIZE // 2**40} TB); "
                         "write the card's size, like 80GB, or use auto")  # fmt: skip
    size = int(value)
    if size < 1:
        raise ValueError(f"{text!r}: a memory size must be at least one byte, like 12GB")
    return size


def parse_duration(text: str) -> float:
    """Seconds in a duration like `90`, `90s`, `10m`, `1h`."""
    m = _DURATION.match(text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration; write it like 90s, 10m or 1h")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def gib(n_bytes: float) -> str:
    """`12.3 GiB`: how every size is printed (GiB, one decimal)."""
    return f"{n_bytes / 2**30:.1f} GiB"


def vram_flag(n_bytes: float) -> str:
    """The `--vram` value a user would type for at least `n_bytes` (rounded up to 0.1 GB)."""
    tenths = -(-int(n_bytes) * 10 // 2**30)
    return f"{tenths // 10}GB" if tenths % 10 == 0 else f"{tenths / 10:.1f}GB"
