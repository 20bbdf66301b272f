"""Which FAISS index to build for N vectors of dimension D within a memory budget, and why.

The rules follow autofaiss's reasoning, kept small enough to read:
  - exact search (``Flat``) while N is small (below ``EXACT_MAX`` vectors) and it fits the budget;
  - ``IVF{nlist},Flat`` (inverted lists, raw vectors) when the raw vectors fit the budget;
  - ``OPQ{m}_{d},IVF{nlist},PQ{m}x8`` (rotation + product quantisation, m bytes a vector) when
    they do not, with m the largest code size that fits; above ``HNSW_COARSE_MIN`` vectors the
    coarse quantiser is an HNSW graph (``IVF{nlist}_HNSW32``) so assigning a vector stays fast.
nlist is about 4 sqrt(N) (a power of two), bounded so each list gets 39+ training vectors.

Example:
    >>> choose_index(5_000, 1280, 2 * 2**30).factory
    'Flat'
    >>> choose_index(10_000_000, 2048, 8 * 2**30).factory
    'OPQ256_1024,IVF16384_HNSW32,PQ256x8'
"""

from __future__ import annotations

import math
from dataclasses import dataclass

EXACT_MAX = 200_000
HNSW_COARSE_MIN = 5_000_000
PQ_BYTES = (256, 192, 128, 96, 64, 48, 32, 24, 16, 8)


@dataclass(frozen=True)
class IndexChoice:
    factory: str
    reason: str
    bytes_per_vector: float
    nlist: int = 0
    needs_training: bool = False


def _nlist(n: int) -> int:
    target = 4 * math.sqrt(max(n, 1))
    nlist = 2 ** max(4, round(math.log2(target)))
    return max(16, min(nlist, n // 39 if n >= 39 * 16 else 16, 2**18))


def choose_index(n: int, dim: int, max_memory_bytes: int) -> IndexChoice:
    """Picks the index for ``n`` vectors of ``dim`` floats under ``max_memory_bytes``."""
    raw = 4 * dim  # float32 bytes a vector
    ids = 8  # the IDMap's int64 id a vector
    if n <= EXACT_MAX and n * (raw + ids) <= max_memory_bytes:
        return IndexChoice("Flat", f"{n} vectors: exact search is fast enough and fits ({n * (raw + ids) / 2**20:.0f} MiB)", raw + ids)
    nlist = _nlist(n)
    coarse = f"IVF{nlist}_HNSW32" if n >= HNSW_COARSE_MIN else f"IVF{nlist}"
    if n * (raw + ids) <= max_memory_bytes:
        return IndexChoice(
            f"{coarse},Flat", f"{n} vectors: raw vectors fit the budget; inverted lists avoid a full scan", raw + ids, nlist, True
        )
    for m in PQ_BYTES:
        per_vector = m + ids
        if m > dim or n * per_vector > max_memory_bytes:
            continue
        # OPQ rotates into a space PQ codes well; reducing to 4m dims (at most D) keeps training cheap.
        reduced = min(dim, 4 * m)
        reduced -= reduced % m
        return IndexChoice(
            f"OPQ{m}_{reduced},{coarse},PQ{m}x8",
            f"{n} vectors x {raw} B do not fit {format_bytes(max_memory_bytes)}: product quantisation to {m} B a vector",
            per_vector,
            nlist,
            True,
        )
    raise ValueError(f"{n} vectors cannot fit {max_memory_bytes} bytes even at 8 bytes a vector; raise --max-index-memory")


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB': a budget as a person reads it, however small or large."""
    for unit, factor in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= factor:
            return f"{n / factor:.1f} {unit}"
    return f"{n} B"


def parse_bytes(text: str) -> int:
    """'4GiB', '512MiB', '2GB', '1e9' -> bytes."""
    units = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12, "b": 1}
    value = text.strip().lower().replace(" ", "")
    for unit, factor in units.items():
        if value.endswith(unit):
            return int(float(value[: -len(unit)]) * factor)
    return int(float(value))
