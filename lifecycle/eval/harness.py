"""Benchmark tasks through lm-evaluation-harness (the library, not a copy), on local task data.

    lifecycle eval MODEL_DIR|models:/NAME/VERSION --suite bench         (in this process)
    lifecycle eval http://HOST:PORT --suite bench --tokenizer MODEL_DIR  (through an endpoint)
    python -m lifecycle.eval.harness write-demo DIR   (two demo tasks as lm-eval task files)

A suite with `source: lm_eval` names tasks that lm-eval's own YAML task files define under
`include_path` — `dataset_path: json` with `dataset_kwargs.data_files` pointing at local
files, since nothing can come from a hub here; multiple-choice (log-likelihood of each choice)
and generation (`generate_until`) tasks alike, with the metrics the task file names (`acc`,
`exact_match`, ...). Only `include_path` is indexed (lm-eval's hundreds of built-in task
files are not scanned: they all read hub datasets).

Where it runs: in-process, lm-eval's `hf` model wraps the model the project loads itself
(`lifecycle.peft_methods.load_finetuned`: safetensors only, adapter dirs too, on the given
device and dtype); through an endpoint, lm-eval's `local-completions` model against
`URL/v1/completions` (log-likelihoods from `echo` + `logprobs`, generations greedy), with
the model's own tokenizer and chat template rendering the prompts on this side, so both
routes score the same token sequences. The endpoint's key goes in a request header built
here (from $LIFECYCLE_API_KEY by the CLI), never in lm-eval's model-argument string.

Results: each task's metrics as `TASK/METRIC` means, and per-item scores (in document order)
for the paired gates (lifecycle/eval/stats.py).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lifecycle.config import EvalSuite


def _task_manager(suite: EvalSuite) -> Any:
    from lm_eval.tasks import TaskManager

    assert suite.include_path is not None  # the config check says so
    root = Path(suite.include_path)
    if not root.is_dir():
        raise ValueError(f"lm_eval suite: include_path {root} is not a directory")
    tm = TaskManager(include_path=str(root), include_defaults=False)
    missing = [t for t in suite.tasks if t not in tm.all_tasks]
    if missing:
        raise ValueError(
            f"lm_eval suite: no task {missing} under {root} (it defines {sorted(tm.all_tasks)})"
        )
    return tm


def _collect(out: dict[str, Any], suite: EvalSuite) -> dict[str, Any]:
    """lm-eval's result dict → {"metrics": {TASK/METRIC: mean}, "items": {TASK/METRIC: per
    document scores}, "n": documents, "outputs": {TASK: model responses}}."""
    metrics: dict[str, float] = {}
    items: dict[str, list[float]] = {}
    outputs: dict[str, list[Any]] = {}
    n = 0
    for task in suite.tasks:
        res = out["results"][task]
        samples = sorted(out["samples"][task], key=lambda s: s["doc_id"])
        n += len(samples)
        for key, value in res.items():
            name, _, filt = key.partition(",")
            if not filt or name.endswith("_stderr") or not isinstance(value, int | float):
                continue
            metrics[f"{task}/{name}"] = float(value)
            items[f"{task}/{name}"] = [float(s[name]) for s in samples if name in s]
        outputs[task] = [s["filtered_resps"] for s in samples]
    return {"metrics": metrics, "items": items, "n": n, "outputs": outputs}


def _evaluate(lm: Any, suite: EvalSuite) -> dict[str, Any]:
    import lm_eval

    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(suite.tasks),
        task_manager=_task_manager(suite),
        num_fewshot=suite.num_fewshot,
        limit=suite.max_items,
        apply_chat_template=suite.apply_chat_template,
        log_samples=True,
        random_seed=suite.seed,
        numpy_random_seed=suite.seed,
        torch_random_seed=suite.seed,
        fewshot_random_seed=suite.seed,
        bootstrap_iters=0,  # the gates bootstrap per item themselves (lifecycle/eval/stats.py)
    )
    if out is None:  # simple_evaluate returns None on non-zero ranks only
        raise RuntimeError("lm-eval returned no results")
    return _collect(out, suite)


def run_harness(
    model_path: str | Path, suite: EvalSuite, device: Any = None, dtype: Any = None
) -> dict[str, Any]:
    """The suite's lm-eval tasks on a model dir (or adapter dir) in this process."""
    from lm_eval.models.huggingface import HFLM

    from lifecycle.models import default_device, load_tokenizer
    from lifecycle.peft_methods import load_finetuned

    tok = load_tokenizer(str(model_path))
    model = load_finetuned(str(model_path), device or default_device(), dtype)
    model.eval()
    lm = HFLM(
        pretrained=model,
        tokenizer=tok,
        batch_size=suite.batch_size,
        max_length=model.config.max_position_embeddings,
        device=str(next(model.parameters()).device),
    )
    return _evaluate(lm, suite)


def run_harness_on_endpoint(
    url: str,
    suite: EvalSuite,
    tokenizer_dir: str | Path,
    api_key: str | None,
    in_flight: int = 8,
) -> dict[str, Any]:
    """The suite's lm-eval tasks through an OpenAI-compatible completions API (`url`
    without /v1; vLLM's own server and the project's endpoint alike), the first model it
    lists, prompts tokenized with `tokenizer_dir`'s tokenizer and chat template."""
    import httpx
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from lifecycle.archs import read_facts
    from lifecycle.models import load_tokenizer

    base = url.rstrip("/")
    header = {"Authorization": f"Bearer {api_key or 'none'}"}
    r = httpx.get(f"{base}/v1/models", headers=header, timeout=60)
    if r.status_code != 200:
        raise ValueError(f"{base}/v1/models answered {r.status_code}: {r.text[:200]}")
    model_id = r.json()["data"][0]["id"]
    tok = load_tokenizer(str(tokenizer_dir))
    context = read_facts(tokenizer_dir).max_position_embeddings  # the model's own config
    lm = LocalCompletionsAPI(
        base_url=f"{base}/v1/completions",
        model=model_id,
        tokenizer=str(tokenizer_dir),
        tokenizer_backend="huggingface",
        tokenized_requests=True,
        num_concurrent=in_flight,
        max_retries=1,
        max_length=context,
        header=header,
    )
    lm.tokenizer = tok  # the project's loader (the chat template it reads), not AutoTokenizer
    res = _evaluate(lm, suite)
    res["model_id"] = model_id
    return res


# A starting point for users' own task files, and what the tests evaluate: the demo tasks
# (lifecycle/data/demo.py) as one multiple-choice and one generation task of lm-eval's format.
_MC_YAML = """\
task: {prefix}_mc
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: multiple_choice
doc_to_text: prompt
doc_to_choice: choices
doc_to_target: label
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""

_GEN_YAML = """\
task: {prefix}_gen
dataset_path: json
dataset_kwargs:
  data_files: {{test: {data}}}
test_split: test
output_type: generate_until
doc_to_text: prompt
doc_to_target: answer
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_new_tokens}
  do_sample: false
filter_list:
  - name: strip
    filter:
      - function: remove_whitespace
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""


def write_demo_tasks(
    out: str | Path,
    n: int = 100,
    seed: int = 7,
    tasks: list[str] | None = None,
    prefix: str = "demo",
    max_new_tokens: int = 12,
) -> list[str]:
    """Writes `<prefix>_mc` (the right answer among four: it and the answers of three other
    held-out items, any task) and `<prefix>_gen` (the answer, greedy, exact match) over `n`
    held-out demo items into `out` (task YAMLs + JSONL); returns the task names."""
    import random

    from lifecycle.data import demo

    if n < 4:
        raise ValueError(f"write_demo_tasks: n={n}; four choices need at least 4 items")
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    examples = demo.instruction_examples(n, seed, tasks, True)
    pairs = [(e["messages"][0]["content"], e["messages"][1]["content"]) for e in examples]
    rng = random.Random(seed)
    mc, gen = [], []
    for i, (prompt, answer) in enumerate(pairs):
        others = sorted({a for _, a in pairs if a != answer})
        wrong = rng.sample(others, 3)
        choices = [*wrong]
        label = rng.randrange(4)
        choices.insert(label, answer)
        mc.append({"id": i, "prompt": prompt, "choices": choices, "label": label})
        gen.append({"id": i, "prompt": prompt, "answer": answer})
    for name, rows, template in (("mc", mc, _MC_YAML), ("gen", gen, _GEN_YAML)):
        data = (root / f"{prefix}_{name}.jsonl").resolve()
        data.write_text("".join(json.dumps(r) + "\n" for r in rows))
        (root / f"{prefix}_{name}.yaml").write_text(
            template.format(
                prefix=prefix, data=json.dumps(str(data)), max_new_tokens=max_new_tokens
            )
        )
    return [f"{prefix}_mc", f"{prefix}_gen"]


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2 or args[0] != "write-demo":
        raise SystemExit("usage: python -m lifecycle.eval.harness write-demo DIR")
    names = write_demo_tasks(args[1])
    print(f"wrote lm-eval tasks {names} to {args[1]}")


if __name__ == "__main__":
    main()
