"""Plain-text formatting shared by the read-side commands (`tensortrace show`, `tensortrace trace`).

>>> int_ranges([0, 1, 2, 5, 6, 6])
'0-2,5-6'
>>> byte_size(512), byte_size(3 << 20)
('512 B', '3.0 MiB')
"""

from __future__ import annotations


def int_ranges(values) -> str:
    """Integers as runs of consecutive values, duplicates ignored: [0,1,2,5,6] -> '0-2,5-6'."""
    out, vs, i = [], sorted(set(values)), 0
    while i < len(vs):
        j = i
        while j + 1 < len(vs) and vs[j + 1] == vs[j] + 1:
            j += 1
        out.append(str(vs[i]) if i == j else f"{vs[i]}-{vs[j]}")
        i = j + 1
    return ",".join(out)


def byte_size(n: float) -> str:
    """A byte count with a binary unit: '512 B', '4.0 KiB', ... up to GiB."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
