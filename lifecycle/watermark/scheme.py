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

The key comes from `lifecycle.watermark.keys` (env var or key file); never from the YAML.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch


@dataclass
class WatermarkScheme:
    hashing_key: int
    vocab_size: int
    gamma: float = 0.25
    delta: float = 2.0
    _cache: dict[int, torch.Tensor] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if not 0 < self.gamma < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {self.gamma}")
        self.greenlist_size = int(self.vocab_size * self.gamma)

    def green_ids(self, prev_token: int) -> torch.Tensor:
        """The green list after `prev_token` (transformers' `_get_greenlist_ids`, lefthash)."""
        ids = self._cache.get(prev_token)
        if ids is None:
            rng = torch.Generator(device="cpu")
            rng.manual_seed((self.hashing_key * int(prev_token)) % (2**64 - 1))
            ids = torch.randperm(self.vocab_size, generator=rng)[: self.greenlist_size]
            if len(self._cache) < 65536:
                self._cache[prev_token] = ids
        return ids

    def is_green(self, prev_token: int, token: int) -> bool:
        return bool((self.green_ids(prev_token) == token).any())

    def bias_logits(self, prev_token: int, logits: torch.Tensor) -> torch.Tensor:
        """`logits` (one row, ≥ vocab_size wide) with δ added to the green ids."""
        ids = self.green_ids(prev_token).to(logits.device)
        out = logits.clone()
        out[ids] += self.delta
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
        pairs = list(itertools.pairwise(token_ids))
        if ignore_repeated:
            pairs = list(dict.fromkeys(pairs))
        n = len(pairs)
        green = sum(self.is_green(a, b) for a, b in pairs)
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
