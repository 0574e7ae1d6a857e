"""Byte sizes as people write them ('8GiB', '512 MB') and as the tools print them."""

import numbers
import re

_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(s) -> int:
    """'8GiB', '8 GB', '512MiB', 1e9 -> bytes."""
    if isinstance(s, numbers.Real):  # numpy numbers too
        return int(s)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][0-9]+)?)\s*([A-Za-z]*)\s*", str(s))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {s!r} (examples: 8GiB, 512MiB, 12GB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n, digits=2) -> str:
    """1536 -> '1.50 KiB' (binary units; whole bytes below 1 KiB)."""
    for unit, k in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= k:
            return f"{n / k:.{digits}f} {unit}"
    return f"{int(n)} B"
