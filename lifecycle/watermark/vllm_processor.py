"""The text watermark inside vLLM (v1 logits-processor API), switched on per request.

    from vllm import LLM, SamplingParams
    llm = LLM(model=DIR, logits_processors=[WatermarkLogitsProcessor])
    params = SamplingParams(extra_args={"watermark": {"gamma": 0.25, "delta": 2.0}})

(or `--logits-processors lifecycle.watermark.vllm_processor:WatermarkLogitsProcessor` for
`vllm serve`; over HTTP the request's `vllm_xargs` carries `watermark`). The engine process
reads the key from $LIFECYCLE_WATERMARK_KEY / $LIFECYCLE_WATERMARK_KEY_FILE when it starts (a
missing key fails the engine's start, not a request); requests without `watermark` are
untouched. The project's server (ray_cluster/serve.py) puts `watermark` on every request. The green lists are
`lifecycle.watermark.scheme.WatermarkScheme`'s, i.e. transformers' lefthash seeding, held in
one byte-bounded `GreenListCache` per engine process, shared by every (γ, δ) the requests ask
for. The whole batch is biased at once: one gather of the packed green lists of the
watermarked rows and one `index_add_` per γ in use; the lists a step lacks are computed on a
background thread from `update_state` on, i.e. during the model's forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from lifecycle.watermark.keys import load_key, watermark_hashing_key
from lifecycle.watermark.scheme import DEFAULT_CACHE_BYTES, GreenListCache, WatermarkScheme


class _Request(NamedTuple):
    scheme: WatermarkScheme
    delta: float
    last_prompt_token: int
    output_ids: Sequence[int]  # vLLM's own list: it grows as the request decodes


def _settings(params: Any) -> tuple[float, float] | None:
    """(γ, δ) of a request, or None when it does not ask for the watermark."""
    wm = (params.extra_args or {}).get("watermark")
    if not wm:
        return None
    settings = wm if isinstance(wm, dict) else {}
    return float(settings.get("gamma", 0.25)), float(settings.get("delta", 2.0))


class WatermarkLogitsProcessor(LogitsProcessor):
    """Adds δ to the keyed green list of every step of the requests that ask for it."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        # The model's own vocabulary (what transformers' detector uses), not a padded width.
        self.vocab_size = vllm_config.model_config.hf_config.vocab_size
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self._schemes: dict[float, WatermarkScheme] = {}  # by γ; δ is applied per row
        self._hashing_key = watermark_hashing_key(load_key())
        self._cache = GreenListCache(
            self.vocab_size, DEFAULT_CACHE_BYTES, prefetch_lists=self.max_num_seqs
        )
        self._reqs: dict[int, _Request] = {}  # by index in vLLM's persistent batch

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """Rejects a bad γ when the request arrives (HTTP 400), not in the engine's step."""
        settings = _settings(sampling_params)
        if settings and not 0 < settings[0] < 1:
            raise ValueError(f"watermark gamma must be in (0, 1), got {settings[0]}")

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely: greedy decoding sees it too

    def cache_stats(self) -> dict[str, int]:
        """The green-list cache's hits, misses and bytes."""
        return self._cache.stats()

    def _scheme(self, gamma: float) -> WatermarkScheme:
        if gamma not in self._schemes:
            self._schemes[gamma] = WatermarkScheme(
                self._hashing_key, self.vocab_size, gamma, cache=self._cache
            )
        return self._schemes[gamma]

    def _new_request(
        self, params: Any, prompt_ids: list[int] | None, output_ids: list[int]
    ) -> _Request | None:
        settings = _settings(params)
        if settings is None:
            return None
        if not prompt_ids:
            raise ValueError("the watermark needs the request's prompt token ids")
        gamma, delta = settings
        return _Request(self._scheme(gamma), delta, prompt_ids[-1], output_ids)

    def _groups(self) -> dict[float, tuple[list[int], list[int], list[float]]]:
        """γ → (rows, previous tokens, δs) of the watermarked requests."""
        groups: dict[float, tuple[list[int], list[int], list[float]]] = {}
        for row, r in self._reqs.items():
            rows, prev, deltas = groups.setdefault(r.scheme.gamma, ([], [], []))
            rows.append(row)
            prev.append(r.output_ids[-1] if r.output_ids else r.last_prompt_token)
            deltas.append(r.delta)
        return groups

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        process_dict_updates(self._reqs, batch_update, self._new_request)
        # Called before the model's forward pass, with the tokens sampled last step already
        # appended: the green lists `apply` will need are known now, and the missing ones are
        # computed on another core while the step goes on.
        for gamma, (_, prev, _) in self._groups().items():
            self._schemes[gamma].prefetch(prev)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        for gamma, (rows, prev, deltas) in self._groups().items():
            self._schemes[gamma].add_bias_(logits, rows, prev, deltas)
        return logits
