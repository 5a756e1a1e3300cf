"""The text watermark: a keyed green list (Kirchenbauer et al. 2023) with transformers' own
seeding ("lefthash", context width 1), so that transformers' `WatermarkDetector` and ours
agree on every token.

For each position the previous token t and the integer key k seed a torch CPU generator with
(k · t) mod (2⁶⁴ − 1); the first ⌊γ·V⌋ ids of `torch.randperm(V)` are green, and δ is added to
their logits. Detection counts green tokens over the (previous, next) pairs of a text:
z = (green − γT) / √(Tγ(1 − γ)).

    from lifecycle.watermark.scheme import WatermarkScheme
    scheme = WatermarkScheme(key_int, vocab_size=280, gamma=0.25, delta=2.0)
    scheme.detect(token_ids)      # {"z": ..., "p_value": ..., "green_fraction": ..., ...}
    scheme.cache.stats()          # {"hits": ..., "misses": ..., "bytes": ..., ...}

The green lists live in a `GreenListCache`: one bit per vocabulary id (V/8 bytes a list,
19 KB at V = 152 k), least recently used evicted first, bounded in bytes. A hit costs a dict
lookup; a miss recomputes the list: torch's `randperm(V)` (~0.55 ms at V = 152 k), or, where
numba is installed (vLLM brings it), the same Mersenne Twister and the first ⌊γ·V⌋ steps of
the same Fisher–Yates shuffle compiled (~0.2 ms), checked against `randperm` once per cache.

The key comes from `lifecycle.watermark.keys` (env var or key file); never from the YAML.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

DEFAULT_CACHE_BYTES = 256 * 2**20
"""Green-list memory of one cache: 14 122 lists at V = 152 064; all V of them for V ≤ 46 341."""


def _green_bits(seed32: int, n: int, size: int, out: np.ndarray) -> None:
    """Sets in `out` (⌈n/8⌉ zeroed uint8) the bits of the first `size` ids of
    `torch.randperm(n)` after `manual_seed(seed)`, `seed32` being the seed's low 32 bits.

    It repeats torch's CPU generator (at::mt19937 seeded by `init_with_uint32`, 32-bit draws)
    and `randperm_cpu`'s Fisher–Yates shuffle (`random() % (n - i)`, the branch for
    n < 2³²/20), but stops after `size` of its n − 1 swaps: the first `size` ids are final
    then. Meant to be compiled with numba (`GreenListCache` checks it against `randperm`).
    """
    m32 = np.uint64(0xFFFFFFFF)
    mt = np.empty(624, dtype=np.uint32)
    mt[0] = np.uint32(seed32)
    for j in range(1, 624):
        prev = np.uint64(mt[j - 1])
        mt[j] = np.uint32((np.uint64(1812433253) * (prev ^ (prev >> 30)) + j) & m32)
    perm = np.arange(n, dtype=np.int32)
    k = 624
    for i in range(size):
        if k == 624:  # the twist: 624 new words
            for t in range(624):
                y = (mt[t] & np.uint32(0x80000000)) | (mt[(t + 1) % 624] & np.uint32(0x7FFFFFFF))
                v = mt[(t + 397) % 624] ^ (y >> np.uint32(1))
                if y & np.uint32(1):
                    v ^= np.uint32(0x9908B0DF)
                mt[t] = v
            k = 0
        y = mt[k]
        k += 1
        y ^= y >> np.uint32(11)
        y ^= (y << np.uint32(7)) & np.uint32(0x9D2C5680)
        y ^= (y << np.uint32(15)) & np.uint32(0xEFC60000)
        y ^= y >> np.uint32(18)
        z = i + np.int64(y % np.uint32(n - i))  # both fit 32 bits: the faster division
        green = perm[z]
        perm[z] = perm[i]
        perm[i] = green
        out[green >> 3] |= np.uint8(1 << (green & 7))


def _compiled_green_bits() -> Any:
    """`_green_bits` compiled (cached on disk by numba), or None without numba."""
    try:
        import numba
    except ImportError:
        return None
    return numba.njit(nogil=True, cache=True)(_green_bits)


class GreenListCache:
    """Green lists as bit masks over the vocabulary, keyed by (seed, green-list size), in one
    preallocated uint8 slab of at most `max_bytes`, least recently used evicted first.

    The slab is one `torch.empty`: its pages become resident only when a list is written to
    them, so an idle cache costs address space, not memory, and a full one costs `max_bytes`.
    Several schemes over the same vocabulary (different γ or δ) may share one cache.
    """

    def __init__(
        self,
        vocab_size: int,
        max_bytes: int = DEFAULT_CACHE_BYTES,
        compiled: bool = True,
        prefetch_lists: int = 0,
    ) -> None:
        """`compiled=False`: misses always call `torch.randperm` (else numba's copy of it, once
        it matched `randperm` on the first miss). `prefetch_lists`: how many lists `prefetch`
        may compute ahead (their bytes come out of `max_bytes`)."""
        self.vocab_size = vocab_size
        self.row_bytes = (vocab_size + 7) // 8
        self.prefetch_lists = min(prefetch_lists, max_bytes // self.row_bytes // 2)
        self.capacity = max_bytes // self.row_bytes - self.prefetch_lists
        if self.capacity < 1:
            raise ValueError(
                f"green-list cache of {max_bytes} bytes cannot hold one list of "
                f"{self.row_bytes} bytes (vocab_size {vocab_size})"
            )
        self._slab = torch.empty(self.capacity, self.row_bytes, dtype=torch.uint8)
        self._slots: OrderedDict[tuple[int, int], int] = OrderedDict()
        self._rng = torch.Generator(device="cpu")  # reseeded for every list
        # None: not tried yet; False: torch.randperm (no numba, or it disagreed)
        self._kernel: Any = None if compiled and vocab_size < 2**32 // 20 else False
        self._pending: dict[tuple[int, int], Future[np.ndarray]] = {}
        self._pool: ThreadPoolExecutor | None = None  # prefetch's one thread, made on first use
        self.hits = self.misses = self.evictions = self.prefetched = 0

    def stats(self) -> dict[str, int]:
        """Counters since construction and the bytes of green lists held now."""
        return {
            "hits": self.hits,
            "misses": self.misses,
            "evictions": self.evictions,
            "prefetched": self.prefetched,
            "lists": len(self._slots),
            "bytes": (len(self._slots) + len(self._pending)) * self.row_bytes,
            "max_bytes": (self.capacity + self.prefetch_lists) * self.row_bytes,
        }

    def _slot(self, seed: int, size: int) -> int:
        key = (seed, size)
        slot = self._slots.get(key)
        if slot is not None:
            self.hits += 1
            self._slots.move_to_end(key)
            return slot
        self.misses += 1
        if len(self._slots) < self.capacity:
            slot = len(self._slots)
        else:
            _, slot = self._slots.popitem(last=False)
            self.evictions += 1
        if self._kernel is None:
            self._kernel = self._checked_kernel(seed, size)
        pending = self._pending.pop(key, None)
        if pending is not None:
            self.prefetched += 1
            row = pending.result()
        elif self._kernel:
            row = self._compiled_bits(seed, size)
        else:
            row = self._randperm_bits(seed, size)
        self._slab[slot] = torch.from_numpy(row)
        self._slots[key] = slot
        return slot

    def prefetch(self, seeds: Sequence[int], size: int) -> None:
        """Starts computing, on one background thread, the lists of `seeds` not held yet, so
        that the lookups that follow find them done (the compiled kernel runs without the GIL:
        on another core, while this thread does something else). Lists prefetched earlier and
        not asked for now are dropped. Does nothing without the compiled kernel or with
        `prefetch_lists=0`."""
        if not self._kernel or not self.prefetch_lists:
            return
        keys = dict.fromkeys((s, size) for s in seeds)
        for key in [k for k, f in self._pending.items() if k not in keys and f.done()]:
            del self._pending[key]
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="green-lists")
        for key in keys:
            if len(self._pending) >= self.prefetch_lists:
                break
            if key not in self._slots and key not in self._pending:
                self._pending[key] = self._pool.submit(self._compiled_bits, *key)

    def _compiled_bits(self, seed: int, size: int) -> np.ndarray:
        row = np.zeros(self.row_bytes, dtype=np.uint8)
        self._kernel(seed & 0xFFFFFFFF, self.vocab_size, size, row)
        return row

    def _randperm_bits(self, seed: int, size: int) -> np.ndarray:
        # transformers' definition (its `_get_greenlist_ids`), then one bit per green id
        self._rng.manual_seed(seed)
        ids = torch.randperm(self.vocab_size, generator=self._rng)[:size].numpy()
        # numpy packs single-threaded: torch would split these small ops over its thread pool,
        # which costs more than it saves (and far more when the cores are busy).
        mask = np.zeros(self.row_bytes * 8, dtype=bool)
        mask[ids] = True
        return np.packbits(mask, bitorder="little")

    def _checked_kernel(self, seed: int, size: int) -> Any:
        kernel = _compiled_green_bits()
        if kernel is None:
            return False
        row = np.zeros(self.row_bytes, dtype=np.uint8)
        kernel(seed & 0xFFFFFFFF, self.vocab_size, size, row)
        if not np.array_equal(row, self._randperm_bits(seed, size)):
            warnings.warn(
                "the compiled green list differs from torch.randperm's (did torch change its "
                "generator?): using torch.randperm, ~4x slower per cache miss",
                stacklevel=3,
            )
            return False
        return kernel

    def _chunks(self, n: int) -> Iterator[slice]:
        # At most `capacity` lookups between two reads of the slab: a later miss in the same
        # chunk can then never evict a list an earlier lookup of the chunk returned.
        for i in range(0, n, self.capacity):
            yield slice(i, min(n, i + self.capacity))

    def masks(self, seeds: Sequence[int], size: int) -> torch.Tensor:
        """The packed green lists of `seeds`: (len(seeds), ⌈V/8⌉) uint8, bit j % 8 of byte
        j // 8 set iff id j is green (a copy: it stays valid after later evictions)."""
        out = torch.empty(len(seeds), self.row_bytes, dtype=torch.uint8)
        for c in self._chunks(len(seeds)):
            out[c] = self._slab[torch.tensor([self._slot(s, size) for s in seeds[c]])]
        return out

    def bits(self, seeds: Sequence[int], size: int, tokens: Sequence[int]) -> torch.Tensor:
        """Whether tokens[i] is in the green list of seeds[i], as a bool tensor (one byte read
        per pair; ids outside [0, V) are never green)."""
        tok = torch.tensor(list(tokens), dtype=torch.int64)
        valid = (tok >= 0) & (tok < self.vocab_size)
        tok = torch.where(valid, tok, 0)
        out = torch.empty(len(tok), dtype=torch.bool)
        for c in self._chunks(len(tok)):
            slots = torch.tensor([self._slot(s, size) for s in seeds[c]], dtype=torch.int64)
            byte = self._slab[slots, tok[c] >> 3]
            out[c] = ((byte >> (tok[c] & 7).to(torch.uint8)) & 1).bool()
        return out & valid


def _bit_table(device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(256, 8): row b holds the 8 bits of byte b, lowest first, as 0/1 of `dtype`."""
    b = torch.arange(256)
    return ((b[:, None] >> torch.arange(8)) & 1).to(device=device, dtype=dtype)


@dataclass
class WatermarkScheme:
    hashing_key: int
    vocab_size: int
    gamma: float = 0.25
    delta: float = 2.0
    cache_bytes: int = DEFAULT_CACHE_BYTES
    cache: GreenListCache | None = field(default=None, repr=False, compare=False)
    """Pass one to share it between schemes over the same vocabulary (else one of
    `cache_bytes` is made)."""
    _tables: dict[tuple[torch.device, torch.dtype], torch.Tensor] = field(
        default_factory=dict, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        self.greenlist_size = int(self.vocab_size * self.gamma)
        if self.cache is None:
            self.cache = GreenListCache(self.vocab_size, self.cache_bytes)
        elif self.cache.vocab_size != self.vocab_size:
            raise ValueError(
                f"green-list cache is for vocab_size {self.cache.vocab_size}, "
                f"the scheme's is {self.vocab_size}"
            )

    def _seed(self, prev_token: int) -> int:
        return (self.hashing_key * int(prev_token)) % (2**64 - 1)

    def green_masks(self, prev_tokens: Sequence[int]) -> torch.Tensor:
        """The packed green lists after each of `prev_tokens` ((n, ⌈V/8⌉) uint8, see
        `GreenListCache.masks`)."""
        return self.cache.masks([self._seed(t) for t in prev_tokens], self.greenlist_size)

    def prefetch(self, prev_tokens: Sequence[int]) -> None:
        """Starts computing the green lists after `prev_tokens` that the cache lacks, in the
        background (see `GreenListCache.prefetch`)."""
        self.cache.prefetch([self._seed(t) for t in prev_tokens], self.greenlist_size)

    def green_ids(self, prev_token: int) -> torch.Tensor:
        """The green list after `prev_token` (transformers' `_get_greenlist_ids`, lefthash),
        as ascending ids."""
        row = self.green_masks([prev_token])[0]
        bits = (row[:, None] >> torch.arange(8, dtype=torch.uint8)) & 1
        return bits.reshape(-1)[: self.vocab_size].nonzero().squeeze(1)

    def is_green(self, prev_token: int, token: int) -> bool:
        return bool(self.cache.bits([self._seed(prev_token)], self.greenlist_size, [token])[0])

    def add_bias_(
        self,
        logits: torch.Tensor,
        rows: Sequence[int],
        prev_tokens: Sequence[int],
        deltas: Sequence[float] | None = None,
    ) -> torch.Tensor:
        """Adds δ (or deltas[i]) in place to the green ids of row rows[i] of `logits`
        ((batch, ≥ vocab_size), any device), whose previous token is prev_tokens[i]; returns
        `logits`. One gather of the packed lists, one table lookup that unpacks them to 0/1 and
        one `index_add_`, whatever the batch."""
        n, v = len(rows), self.vocab_size
        if n == 0:
            return logits
        dev, dtype = logits.device, logits.dtype
        packed = self.green_masks(prev_tokens).to(dev, non_blocking=True)
        table = self._tables.get((dev, dtype))
        if table is None:
            table = self._tables[(dev, dtype)] = _bit_table(dev, dtype)
        bias = torch.nn.functional.embedding(packed.long(), table).view(n, -1)[:, :v]
        alpha = self.delta
        if deltas is not None:
            if len(set(deltas)) == 1:
                alpha = deltas[0]
            else:
                bias = bias * torch.tensor(deltas, device=dev, dtype=dtype)[:, None]
                alpha = 1.0
        index = torch.tensor(list(rows), device=dev)
        logits[:, :v].index_add_(0, index, bias, alpha=alpha)
        return logits

    def bias_logits(self, prev_token: int, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row, ≥ vocab_size wide) with δ added to the green ids."""
        out = logits.clone()
        self.add_bias_(out.unsqueeze(0), [0], [prev_token])
        return out

    def detect(
        self, token_ids: Sequence[int], z_threshold: float = 4.0, ignore_repeated: bool = True
    ) -> dict[str, Any]:
        """z-score, one-sided p-value, green fraction and verdict of a token sequence (every
        token after the first is scored against its predecessor, as transformers does).

        `ignore_repeated` (transformers' `ignore_repeated_ngrams`) scores each distinct
        (previous, next) pair once: repetitive text — which small models produce — otherwise
        counts one lucky or unlucky pair dozens of times and swings z far from 0 either way.
        """
        pairs = list(itertools.pairwise(int(t) for t in token_ids))
        if ignore_repeated:
            pairs = list(dict.fromkeys(pairs))
        n = len(pairs)
        if n == 0:
            return {
                "z": 0.0,
                "p_value": 1.0,
                "green_fraction": 0.0,
                "tokens": 0,
                "green": 0,
                "watermarked": False,
                "z_threshold": z_threshold,
            }
        seeds = [self._seed(a) for a, _ in pairs]
        green = int(self.cache.bits(seeds, self.greenlist_size, [b for _, b in pairs]).sum())
        z = (green - self.gamma * n) / math.sqrt(n * self.gamma * (1 - self.gamma))
        return {
            "z": z,
            "p_value": 0.5 * math.erfc(z / math.sqrt(2)),
            "green_fraction": green / n,
            "tokens": n,
            "green": green,
            "watermarked": z >= z_threshold,
            "z_threshold": z_threshold,
        }

    def transformers_config(self) -> Any:
        """The same settings as a transformers `WatermarkingConfig` (for `generate` and
        `WatermarkDetector`)."""
        from transformers import WatermarkingConfig

        return WatermarkingConfig(
            greenlist_ratio=self.gamma,
            bias=self.delta,
            hashing_key=self.hashing_key,
            seeding_scheme="lefthash",
            context_width=1,
        )
