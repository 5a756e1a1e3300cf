"""One step of every algorithm as plain PyTorch, on a device and dtype, with no Ray, Prefect
or MLflow: what a GPU machine that has torch (and none of the platform) can check.

    python scripts/gpu_check.py --device cuda --dtype bfloat16            # on a GPU machine
    python scripts/gpu_check.py --device cpu --block ray,prefect,mlflow   # what the tests run

Tiny random-init models of the real architectures (Llama, Mixtral-style MoE; the compress
check also every architecture lifecycle/tiny.py builds) with a BPE tokenizer trained here on
the demo tasks; nothing is downloaded. For each algorithm — the
pretraining/SFT step (full and LoRA), distillation, the reward model, DPO, GRPO, PPO, the
compressors (SmoothQuant/GPTQ int8, AWQ/GPTQ int4), the held-out loss and greedy
evaluation — a few steps on one fixed batch: the loss is finite and falls, the trained
parameters moved, the frozen ones (a LoRA base, DPO/GRPO/PPO's reference) did not, and the
tensors live on the requested device. `--dtype bfloat16` runs the forwards under autocast with
fp32 master weights, as the training loop does.

Prints one JSON object per check, then a summary line; exits 1 when a check failed.
`--block` makes those packages unimportable first, and imports every lifecycle/ module.
Needs torch, transformers, peft, tokenizers, pyarrow, pyyaml and pydantic (the GPU image has
all but pydantic: carry its wheels, see ../.library/device/README.md).
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import pkgutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def block(names: set[str]) -> None:
    """Makes the named top-level packages unimportable, as if they were not installed: `import`
    raises ModuleNotFoundError and `importlib.util.find_spec` answers None (the documented
    sys.modules[name] = None)."""
    for n in list(sys.modules):
        if n.split(".")[0] in names:
            del sys.modules[n]
    for n in names:
        sys.modules[n] = None  # type: ignore[assignment]


def import_lifecycle(blocked: set[str]) -> dict[str, Any]:
    """Imports every lifecycle/ module. A module that needs a blocked package fails the check;
    one that needs an optional engine absent here (vLLM) is listed as skipped."""
    import lifecycle

    ok, skipped, failed = [], {}, {}
    for mod in pkgutil.walk_packages(lifecycle.__path__, "lifecycle."):
        try:
            importlib.import_module(mod.name)
            ok.append(mod.name)
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            (failed if top in blocked or top == "lifecycle" else skipped)[mod.name] = str(e)
    return {"imported": len(ok), "skipped": skipped, "failed": failed, "passed": not failed}


# --------------------------------------------------------------------------------------------
# Fixtures: tokenizer, models, batches
# --------------------------------------------------------------------------------------------


class Setup:
    """One architecture's model and tokenizer for every check: `arch="own"` is the project's
    own (a grouped-query Llama built from `pretrain.model`, the data stage's BPE tokenizer and
    chat template); any `lifecycle.tiny` model type is that family's tiny random model dir
    with its own tokenizer and chat template."""

    def __init__(self, device: str, dtype: str, workdir: Path, arch: str = "own") -> None:
        import torch

        from lifecycle.config import ModelConfig
        from lifecycle.data import demo
        from lifecycle.data.tokenizer import train_bpe
        from lifecycle.training import autocast_for

        self.device = torch.device(device)
        self.dtype = getattr(torch, dtype)
        self.autocast = autocast_for(self.device, self.dtype)
        self.arch = arch
        self.workdir = workdir / arch
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tasks = ["copy", "upper"]
        texts = [r["text"] for r in demo.generate(300, 0, tasks=self.tasks)]
        self.model_dir: Path | None = None
        if arch == "own":
            self.tok = train_bpe(texts, 288, 2, self.workdir / "tok")
        else:
            from lifecycle import tiny
            from lifecycle.models import chat_tokenizer

            self.model_dir = tiny.build(arch, self.workdir / "model")
            self.tok = chat_tokenizer(self.model_dir)
        self.model_cfg = ModelConfig(
            hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128
        )
        self.blocks = self._blocks(texts)

    def _blocks(self, texts: list[str]) -> Any:
        import torch

        ids = self.tok("\n".join(texts), add_special_tokens=False)["input_ids"]
        n = len(ids) // 64
        return torch.tensor(ids[: n * 64]).view(n, 64)[:16]

    def model(self, **overrides: Any) -> Any:
        """A fresh copy of this architecture's model on the device (fp32 master weights)."""
        from lifecycle.models import build_model, load_model

        if self.model_dir is not None:
            return load_model(self.model_dir, self.device)
        cfg = self.model_cfg.model_copy(update=overrides)
        return build_model(cfg, self.tok, seed=0).to(self.device)

    def sft_rows(self, n: int = 16) -> tuple[Any, Any, Any]:
        import torch

        from lifecycle.data import demo
        from lifecycle.data.instruct import build_rows

        msgs = [ex["messages"] for ex in demo.instruction_examples(n, 0, self.tasks)]
        ids, labels, _ = build_rows(msgs, self.tok, 32, packing=False)
        from lifecycle.eval.lm import padding_mask

        x = torch.tensor(ids)
        return x, torch.tensor(labels), padding_mask(x, self.tok.pad_token_id)

    def prompts(self, n: int = 4) -> list[str]:
        from lifecycle.data import demo
        from lifecycle.data.instruct import prompt_and_answer

        return [
            prompt_and_answer(ex["messages"], self.tok)[0]
            for ex in demo.instruction_examples(n, 1, self.tasks)
        ]


def snapshot(m: Any) -> dict[str, Any]:
    return {n: p.detach().clone() for n, p in m.named_parameters()}


def moved(m: Any, before: dict[str, Any], which: Callable[[str], bool] = lambda n: True) -> bool:
    import torch

    return any(not torch.equal(p, before[n]) for n, p in m.named_parameters() if which(n))


def on_device(m: Any, device: Any) -> bool:
    return all(p.device.type == device.type for p in m.parameters())


def lm_steps(s: Setup, model: Any, batch: Any, steps: int, lr: float, **loss_kw: Any) -> dict:
    """`steps` optimizer steps (2 micro-batches each) on one fixed batch through
    lifecycle.training.train_step; the loss on that batch before and after."""
    import torch

    from lifecycle.config import PretrainConfig
    from lifecycle.training import lm_loss, make_optimizer, make_scheduler, train_step

    cfg = PretrainConfig(lr=lr, warmup_steps=1, max_steps=steps, weight_decay=0.0)
    opt = make_optimizer(model, cfg)
    sched = make_scheduler(opt, cfg)
    x, y, mask = (t.to(s.device) if t is not None else None for t in batch)
    half = len(x) // 2
    micro = [(x[:half], y[:half], None if mask is None else mask[:half])]
    micro.append((x[half:], y[half:], None if mask is None else mask[half:]))

    def loss_fn(net: Any, b: Any) -> Any:
        return lm_loss(net, b, **loss_kw)

    with torch.no_grad(), s.autocast():
        before = float(loss_fn(model, (x, y, mask)))
    losses = [
        train_step(model, opt, sched, micro, grad_clip=1.0, loss_fn=loss_fn, autocast=s.autocast)
        for _ in range(steps)
    ]
    with torch.no_grad(), s.autocast():
        after = float(loss_fn(model, (x, y, mask)))
    return {"loss_before": before, "loss_after": after, "step_losses": losses}


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------


def check_pretrain(s: Setup) -> dict:
    out = {}
    for arch in ("llama", "mixtral") if s.model_dir is None else (s.arch,):
        model = s.model(arch=arch)
        p0 = snapshot(model)
        r = lm_steps(s, model, (s.blocks, s.blocks, None), steps=8, lr=3e-3)
        out[arch] = {**r, "moved": moved(model, p0), "on_device": on_device(model, s.device)}
    passed = all(
        math.isfinite(v["loss_after"]) and v["loss_after"] < v["loss_before"] and v["moved"]
        for v in out.values()
    )
    return {**out, "passed": passed}


def check_sft(s: Setup) -> dict:
    from lifecycle.config import SFTConfig
    from lifecycle.peft_methods import apply_method

    out = {}
    for method in ("full", "lora"):
        model = s.model()
        cfg = SFTConfig(method=method)
        model = apply_method(model, cfg).to(s.device)
        p0 = snapshot(model)
        r = lm_steps(s, model, s.sft_rows(), steps=8, lr=1e-2 if method == "lora" else 3e-3)
        full = method == "full"
        trained = moved(model, p0, lambda n, full=full: full or "lora_" in n)
        frozen_kept = method == "full" or not moved(model, p0, lambda n: "lora_" not in n)
        out[method] = {**r, "trained_moved": trained, "frozen_unchanged": frozen_kept}
    passed = all(
        v["loss_after"] < v["loss_before"] and v["trained_moved"] and v["frozen_unchanged"]
        for v in out.values()
    )
    return {**out, "passed": passed}


def check_distill(s: Setup) -> dict:
    from lifecycle.compress.distill import student_from_teacher
    from lifecycle.config import DistillConfig

    teacher = s.model().eval().requires_grad_(False)
    # Another architecture's teacher: a random-init Llama student on the same vocabulary.
    cfg = DistillConfig(
        student=s.model_cfg.model_copy(update={"num_layers": 1, "intermediate_size": 64}),
        init_from_teacher=s.model_dir is None,
    )
    student = student_from_teacher(teacher, cfg, s.tok).to(s.device)
    t0 = snapshot(teacher)
    r = lm_steps(
        s,
        student,
        s.sft_rows(),
        steps=8,
        lr=3e-3,
        teacher=teacher,
        temperature=cfg.temperature,
        alpha=cfg.alpha,
    )
    kept = not moved(teacher, t0)
    return {**r, "teacher_unchanged": kept, "passed": r["loss_after"] < r["loss_before"] and kept}


def _pairs(s: Setup) -> tuple[Any, Any]:
    import torch

    from lifecycle.data.preference import demo_pairs
    from lifecycle.rlhf.reward import pair_rows

    cx, cy, rx, ry, _ = pair_rows(demo_pairs(16, 0, s.tasks), s.tok, 32)
    return (torch.tensor(cx), torch.tensor(cy)), (torch.tensor(rx), torch.tensor(ry))


def check_reward(s: Setup) -> dict:
    import torch

    from lifecycle.models import save_model
    from lifecycle.rlhf.algorithms import reward_step
    from lifecycle.rlhf.reward import reward_model_from

    save_model(s.model().cpu(), s.tok, s.workdir / "base")
    rm = reward_model_from(s.workdir / "base").to(s.device)
    (cx, _), (rx, _) = _pairs(s)
    opt = torch.optim.AdamW(rm.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        with s.autocast():
            loss, stats = reward_step(rm, cx, rx, s.tok.pad_token_id)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    ok = all(map(math.isfinite, losses)) and losses[-1] < losses[0]
    return {"losses": losses, "accuracy": stats["train/accuracy"], "passed": ok}


def _policy_and_ref(s: Setup) -> tuple[Any, Any]:
    policy = s.model()
    ref = copy.deepcopy(policy).requires_grad_(False).eval()
    return policy, ref


def check_dpo(s: Setup) -> dict:
    import torch

    from lifecycle.rlhf.algorithms import dpo_step

    policy, ref = _policy_and_ref(s)
    p0, r0 = snapshot(policy), snapshot(ref)
    chosen, rejected = _pairs(s)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        with s.autocast():
            loss, stats = dpo_step(policy, ref, chosen, rejected, s.tok.pad_token_id, 0.5, 0.1)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    ok = (
        all(map(math.isfinite, losses))
        and losses[-1] < losses[0]
        and moved(policy, p0)
        and not moved(ref, r0)
    )
    return {"losses": losses, "reward_accuracy": stats["rewards/accuracy"], "passed": ok}


def _judge(prompts: list[str], responses: list[str]) -> list[float]:
    from lifecycle.data.preference import ProgramJudge

    j = ProgramJudge()
    return [j.score(p, r) for p, r in zip(prompts, responses, strict=True)]


def check_grpo(s: Setup) -> dict:
    import torch

    from lifecycle.rlhf.algorithms import grpo_step

    policy, ref = _policy_and_ref(s)
    p0, r0 = snapshot(policy), snapshot(ref)
    opt = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    torch.manual_seed(0)
    losses = []
    for _ in range(3):
        with s.autocast():
            loss, stats = grpo_step(policy, ref, s.tok, s.prompts(), _judge, 4, 6, 0.05)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    ok = all(map(math.isfinite, losses)) and moved(policy, p0) and not moved(ref, r0)
    # the last step's KL, after two updates: positive (0 would mean the policy never moved)
    return {"losses": losses, "kl": stats["train/kl"], "passed": ok and stats["train/kl"] > 0}


def check_ppo(s: Setup) -> dict:
    import torch

    from lifecycle.rlhf.algorithms import ppo_step
    from lifecycle.rlhf.ppo import ValueHead

    policy, ref = _policy_and_ref(s)
    head = ValueHead(policy.config.hidden_size).to(s.device)
    p0, r0 = snapshot(policy), snapshot(ref)
    opt = torch.optim.AdamW([*policy.parameters(), *head.parameters()], lr=5e-3)
    torch.manual_seed(0)
    stats = []
    for _ in range(4):  # a constant reward: fixed returns, so the value loss must fall
        with s.autocast():
            stats.append(
                ppo_step(
                    policy,
                    head,
                    ref,
                    s.tok,
                    s.prompts(),
                    lambda p, r: [1.0] * len(r),
                    opt,
                    max_new_tokens=6,
                    kl_coef=0.0,
                    epochs=4,
                )
            )
    vl = [st["train/value_loss"] for st in stats]
    # Each step is a new rollout of a moving policy: a later batch can be a hard one (a
    # tiny Mistral's 4th was, in bf16), so the value head must have halved its loss on some
    # later step, not necessarily the last.
    ok = min(vl[1:]) < 0.5 * vl[0] and moved(policy, p0) and not moved(ref, r0)
    return {"value_losses": vl, "passed": ok and all(map(math.isfinite, vl))}


# Logits cosine, compressed vs original, per method: the bounds tests/unit/test_compress.py
# holds every architecture to (int4 is looser: Gemma's post-norms carry the rounding noise of
# random-init weights to the logits undamped).
COMPRESS_MIN_COSINE = {"w8a8": 0.999, "w4a16": 0.94, "awq": 0.94}


def check_compress(s: Setup) -> dict:
    """SmoothQuant/GPTQ int8, GPTQ int4 and AWQ on the device, forwards in the run's dtype:
    the project's own grouped-query Llama, then every dense architecture lifecycle/tiny.py
    builds (Gemma's (1 + w) norms, Qwen2's biases, Phi-3's fused projections); the MoE one
    must be refused."""
    import torch
    from transformers import AutoModelForCausalLM

    from lifecycle import tiny
    from lifecycle.archs import ARCHS
    from lifecycle.compress.quantize import NotQuantizable, compress_weights
    from lifecycle.config import QuantizeConfig

    x = s.blocks[:8]
    models: dict[str, Callable[[], Any]] = {"lifecycle-gqa": lambda: s.model().eval()}
    for mt in tiny.ARCHITECTURES:
        path = tiny.build(mt, s.workdir / f"tiny-{mt}")
        models[mt] = lambda p=path: AutoModelForCausalLM.from_pretrained(p).to(s.device).eval()
    out: dict[str, Any] = {}
    for name, make in models.items():
        if name in ARCHS and ARCHS[name].quantize_refusal:
            try:
                compress_weights(make(), [x[:4]], QuantizeConfig(method="w4a16"))
                out[name] = {"refused": False}
            except NotQuantizable:
                out[name] = {"refused": True}
            continue
        ids = x.to(s.device)
        for method, algorithm in (("w8a8", "gptq"), ("w4a16", "gptq"), ("awq", "rtn")):
            model = make()
            with torch.no_grad():
                ref = model(input_ids=ids).logits.float()
            cfg = QuantizeConfig(method=method, algorithm=algorithm, group_size=32, awq_grid=5)
            res = compress_weights(model, [ids[:4], ids[4:]], cfg, device=s.device, dtype=s.dtype)
            with torch.no_grad():
                got = model(input_ids=ids).logits.float()
            cos = float(torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0))
            out[f"{name}/{method}"] = {
                "cosine": round(cos, 5),
                "logits_rel_error": round(float((got - ref).norm() / ref.norm()), 4),
                "layers": len(res["scales"]),
                "layer_forwards": res["log"]["layer_forwards"],
                "passed": len(res["scales"]) > 0 and cos > COMPRESS_MIN_COSINE[method],
            }
    passed = all(v.get("passed", v.get("refused")) for v in out.values())
    return {**out, "passed": passed}


def check_eval(s: Setup) -> dict:
    import torch

    from lifecycle.eval.generate import exact_match
    from lifecycle.eval.lm import mean_nll_rows, nll_sum
    from lifecycle.training import LMData, evaluate

    model = s.model()
    x, y, mask = s.sft_rows(8)
    data = LMData(x, x, y, y, s.tok.pad_token_id)
    loss = evaluate(model, data, 4, 2, device=s.device, autocast=s.autocast)
    with torch.no_grad(), s.autocast():
        total, n = nll_sum(model, x.to(s.device), y.to(s.device), mask.to(s.device))
        rows = [(r[m.bool()].tolist(), 1) for r, m in zip(x, mask, strict=True)]
        ragged = mean_nll_rows(model, rows, s.tok.pad_token_id)
    em = exact_match(model, s.tok, s.prompts(), ["x"] * 4, max_new_tokens=4)
    ok = math.isfinite(loss) and abs(loss - total / n) < 1e-2 * loss and math.isfinite(ragged)
    return {"heldout_loss": loss, "nll_mean": total / n, "exact_match": em, "passed": ok}


CHECKS: dict[str, Callable[[Setup], dict]] = {
    "pretrain": check_pretrain,
    "sft": check_sft,
    "distill": check_distill,
    "reward": check_reward,
    "dpo": check_dpo,
    "grpo": check_grpo,
    "ppo": check_ppo,
    "compress": check_compress,
    "eval": check_eval,
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--block", default="", help="comma-separated packages to make unimportable")
    ap.add_argument("--only", default="", help="comma-separated checks (default: all)")
    ap.add_argument(
        "--arch",
        default="own",
        help="comma-separated: own (the project's Llama) and/or lifecycle.tiny model types, "
        "or all (default: own; the compress check covers every architecture either way)",
    )
    args = ap.parse_args()
    blocked = {b for b in args.block.split(",") if b}
    results: dict[str, dict] = {}
    if blocked:
        block(blocked)
        results["imports"] = import_lifecycle(blocked)
        print(json.dumps({"check": "imports", **results["imports"]}), flush=True)
    import torch

    torch.manual_seed(0)
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    from lifecycle.tiny import ARCHITECTURES

    archs = [a for a in args.arch.split(",") if a]
    if archs == ["all"]:
        archs = ["own", *ARCHITECTURES]
    with tempfile.TemporaryDirectory() as d:
        for arch in archs:
            setup = Setup(args.device, args.dtype, Path(d), arch)
            for name in names:
                if name == "compress" and arch != "own" and "own" in archs:
                    continue  # the own Setup's compress check covers every architecture
                key = name if arch == "own" else f"{arch}/{name}"
                t0 = time.perf_counter()
                try:
                    res = CHECKS[name](setup)
                except Exception as e:  # report and go on: every check gets its line
                    res = {
                        "passed": False,
                        "error": f"{type(e).__name__}: {e}",
                        "trace": traceback.format_exc()[-2000:],
                    }
                res["seconds"] = round(time.perf_counter() - t0, 2)
                results[key] = res
                print(json.dumps({"check": key, **res}, default=float), flush=True)
    failed = [n for n, r in results.items() if not r["passed"]]
    print(
        json.dumps(
            {
                "summary": {
                    "device": args.device,
                    "dtype": args.dtype,
                    "archs": archs,
                    "torch": torch.__version__,
                    "failed": failed,
                }
            }
        ),
        flush=True,
    )
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
