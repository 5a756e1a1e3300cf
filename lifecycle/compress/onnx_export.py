"""ONNX export of a causal LM (fp32, logits of a full sequence, no KV cache), checked by
running the exported graph in onnxruntime against PyTorch on the same input.

    from lifecycle.compress.onnx_export import export_onnx
    report = export_onnx("path/to/model", "out/model.onnx")   # {"max_rel_diff": ...}
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch


class _LogitsOnly(torch.nn.Module):
    """input_ids → logits, without cache or attention-mask plumbing (what ONNX needs)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits


def export_onnx(model_dir: str | Path, out_path: str | Path, seq_len: int = 16) -> dict[str, Any]:
    """Exports `model_dir` (fp32) to `out_path` with dynamic batch and sequence axes; runs a
    forward pass in onnxruntime and in PyTorch and returns their largest relative difference
    (|a - b| / max|b| over the logits)."""
    import onnxruntime as ort

    from lifecycle.models import load_model

    model = load_model(model_dir).float().eval()
    wrapped = _LogitsOnly(model).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    example = torch.randint(3, vocab, (2, seq_len), generator=g)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    batch, seq = (
        torch.export.Dim("batch", min=1, max=1024),
        torch.export.Dim("seq", min=2, max=4096),
    )
    with torch.no_grad():
        program = torch.onnx.export(
            wrapped,
            (example,),
            dynamo=True,
            input_names=["input_ids"],
            output_names=["logits"],
            dynamic_shapes={"input_ids": {0: batch, 1: seq}},
        )
        program.save(str(out_path))
        check = torch.randint(3, vocab, (3, seq_len + 5), generator=g)
        ref = wrapped(check).numpy()
    sess = ort.InferenceSession(str(out_path), providers=["CPUExecutionProvider"])
    got = sess.run(["logits"], {"input_ids": check.numpy()})[0]
    diff = float(abs(got - ref).max() / max(1e-12, float(abs(ref).max())))
    return {
        "path": str(out_path),
        "max_rel_diff": diff,
        "bytes": sum(p.stat().st_size for p in out_path.parent.glob(out_path.name + "*")),
    }
