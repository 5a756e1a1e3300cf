"""The text watermark inside vLLM (v1 logits-processor API), switched on per request.

    from vllm import LLM, SamplingParams
    llm = LLM(model=DIR, logits_processors=[WatermarkLogitsProcessor])
    params = SamplingParams(extra_args={"watermark": {"gamma": 0.25, "delta": 2.0}})

(or `--logits-processors lifecycle.watermark.vllm_processor:WatermarkLogitsProcessor` for
`vllm serve`; over HTTP the request's `vllm_xargs` carries `watermark`). The engine process
reads the key from $LIFECYCLE_WATERMARK_KEY / $LIFECYCLE_WATERMARK_KEY_FILE when the first
watermarked request arrives; requests without `watermark` are untouched. The green lists are
`lifecycle.watermark.scheme.WatermarkScheme`'s, i.e. transformers' lefthash seeding.
"""

from __future__ import annotations

from typing import Any

import torch
from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

from lifecycle.watermark.keys import load_key, watermark_hashing_key
from lifecycle.watermark.scheme import WatermarkScheme


class WatermarkLogitsProcessor(AdapterLogitsProcessor):
    """Adds δ to the keyed green list of every step of the requests that ask for it."""

    def __init__(self, vllm_config: Any, device: torch.device, is_pin_memory: bool) -> None:
        super().__init__(vllm_config, device, is_pin_memory)
        # The model's own vocabulary (what transformers' detector uses), not a padded width.
        self.vocab_size = vllm_config.model_config.hf_config.vocab_size
        self._schemes: dict[tuple[float, float], WatermarkScheme] = {}
        self._hashing_key: int | None = None

    def is_argmax_invariant(self) -> bool:
        return False  # it changes which token is most likely: greedy decoding sees it too

    def _scheme(self, gamma: float, delta: float) -> WatermarkScheme:
        if self._hashing_key is None:
            self._hashing_key = watermark_hashing_key(load_key())
        key = (gamma, delta)
        if key not in self._schemes:
            self._schemes[key] = WatermarkScheme(self._hashing_key, self.vocab_size, gamma, delta)
        return self._schemes[key]

    def new_req_logits_processor(self, params: Any) -> Any:
        wm = (params.extra_args or {}).get("watermark")
        if not wm:
            return None
        settings = wm if isinstance(wm, dict) else {}
        scheme = self._scheme(float(settings.get("gamma", 0.25)), float(settings.get("delta", 2.0)))

        def apply(
            prompt_ids: list[int], output_ids: list[int], logits: torch.Tensor
        ) -> torch.Tensor:
            prev = output_ids[-1] if output_ids else prompt_ids[-1]
            return scheme.bias_logits(prev, logits)

        return apply
