"""Knowledge distillation: a smaller student from the teacher, and the loss that trains it.

Used by the distill stage's Ray Train loop (ray_cluster/train.py, kind "distill"); run the
stage alone with `lifecycle run CONFIG --stages distill --set distill.max_steps=100`.

- `student_from_teacher`: builds the student from its YAML config; with `init_from_teacher`
  it starts from the teacher: evenly spaced teacher layers (first and last included), every
  tensor whose shape matches copied, and a narrower MLP keeping the teacher's neurons with
  the largest ‖up_j‖·‖gate_j‖·‖down_:,j‖ (structured width pruning, as in Minitron).
- `distill_loss`: α · T² · KL(teacher_T ‖ student_T) over every real token position, plus
  (1 - α) · the LM loss on the labelled (assistant) tokens (Hinton et al. 2015).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from lifecycle.config import DistillConfig
from lifecycle.data.instruct import IGNORE


def _pick_layers(n_teacher: int, n_student: int) -> list[int]:
    if n_student == 1:
        return [0]
    return [round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)]


@torch.no_grad()
def student_from_teacher(teacher: torch.nn.Module, cfg: DistillConfig, tokenizer: Any) -> Any:
    """The student model (random init from `cfg.student`, then teacher weights where they fit)."""
    from lifecycle.models import build_model

    student = build_model(cfg.student, tokenizer, cfg.seed)
    if not cfg.init_from_teacher:
        return student
    t_state = teacher.state_dict()
    s_layers = student.model.layers
    picks = _pick_layers(len(teacher.model.layers), len(s_layers))
    for name, param in student.state_dict().items():
        src = name
        if name.startswith("model.layers."):
            i, rest = name.removeprefix("model.layers.").split(".", 1)
            src = f"model.layers.{picks[int(i)]}.{rest}"
        t = t_state.get(src)
        if t is not None and t.shape == param.shape:
            param.copy_(t)
    # A narrower MLP: keep the most important teacher neurons.
    for i, layer in enumerate(s_layers):
        t_mlp = teacher.model.layers[picks[i]].mlp
        s_mlp = layer.mlp
        if t_mlp.up_proj.weight.shape[1] != s_mlp.up_proj.weight.shape[1]:
            continue  # hidden sizes differ: nothing maps
        width = s_mlp.up_proj.weight.shape[0]
        if width >= t_mlp.up_proj.weight.shape[0]:
            continue
        score = (
            t_mlp.up_proj.weight.norm(dim=1)
            * t_mlp.gate_proj.weight.norm(dim=1)
            * t_mlp.down_proj.weight.norm(dim=0)
        )
        keep = score.topk(width).indices.sort().values
        s_mlp.up_proj.weight.copy_(t_mlp.up_proj.weight[keep])
        s_mlp.gate_proj.weight.copy_(t_mlp.gate_proj.weight[keep])
        s_mlp.down_proj.weight.copy_(t_mlp.down_proj.weight[:, keep])
    return student


def distill_loss(
    logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    temperature: float,
    alpha: float,
) -> torch.Tensor:
    """α·T²·KL(p_teacher ‖ p_student) at temperature T, averaged over real tokens, plus
    (1 − α)·cross-entropy on the labelled next tokens."""
    vocab = logits.shape[-1]
    s = logits[:, :-1].float()
    t = teacher_logits[:, :-1].float()
    ce = F.cross_entropy(s.reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE)
    real = (
        torch.ones(s.shape[:2], dtype=torch.bool, device=s.device)
        if attention_mask is None
        else attention_mask[:, :-1].bool()
    )
    log_ps = F.log_softmax(s / temperature, dim=-1)
    log_pt = F.log_softmax(t / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    kl = (kl * real).sum() / real.sum().clamp(min=1)
    return alpha * temperature**2 * kl + (1 - alpha) * ce
