"""The config schemas: one dataclass per config group, registered with Hydra's ConfigStore.

These dataclasses are the single place where msp's defaults live; the YAML files under ``conf/`` only pick values
(``conf/data/tiny.yaml`` sets ``nsamples: 4``), and where a file picked nothing it is empty. Composing a config
merges the YAML into its schema, so an unknown key (``allocation.lamda=0.1``), a typo'd nested key or a wrong type
(``data.nsamples=abc``) fails at compose time naming the key. Value checks that need more than a type (ranges,
N:M, bounds against the target) run once, in :func:`msp.run.validate_early`, before any weights are loaded.

How defaults flow: schema (here) → YAML option (``conf/<group>/<option>.yaml``: values only) → command line →
:class:`msp.run.RunSpec` (typed, validated) → the library, whose functions take typed arguments.

The search's schema is the search's own :class:`msp.search.settings.SearchConfig`; it is registered for
``allocation=msp`` (the search keeps the ``allocation=msp`` name and its ``allocation.*`` keys, which the command
lines in the docs and experiments use). Every allocation schema is named in one table,
:data:`msp.allocation.registry.ALLOCATORS`.

Types are chosen so that a composed config of an existing command is unchanged, and so is its config hash
(:func:`msp.sweep.config_hash`): e.g. ``owl``'s ``M`` stays an int when given as one.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, List, Optional, Union

from omegaconf import MISSING

from msp.errors import MspError


# ---------------------------------------------------------------------------------------------------- model, data


@dataclass
class ModelConfig:
    """``model=``: what differs between models. ``loader``, ``max_seqlen`` and ``licence`` are facts about
    ``name`` (they do not change a run's numbers, so the config hash leaves them out)."""

    name: str = MISSING  # smollm2-135m | gemma3-270m | tiny-llama, tiny-gpt2, ... (msp.models.TINY_MODELS) | a hub name | a local folder
    revision: Optional[str] = None  # hub revision (branch, tag or commit)
    loader: str = "hf"  # hf (transformers, hub or folder) | gguf (the embedded SmolLM2 GGUF) | tiny (random, seeded)
    max_seqlen: Optional[int] = None  # the model's context in tokens, checked before loading (null: read when loaded)
    licence: Optional[str] = None  # the weights' licence, for the record
    bos_per_window: bool = False  # every calibration, fitness and evaluation window starts with the BOS token (Gemma needs it)
    blocks: Optional[str] = None  # dotted path of the decoder blocks' ModuleList (model.layers, transformer.h); null: found automatically


@dataclass
class DataConfig:
    """``data=``: calibration and evaluation windows (embedded offline text by default, CPU-sized)."""

    calibration: str = "book"  # book | wiki | wikitext2 | c4 | ptb
    evaluation: List[str] = field(default_factory=lambda: ["wiki"])  # perplexity datasets
    nsamples: int = 32  # calibration windows
    seqlen: int = 512  # tokens per window (calibration and evaluation)
    heldout_fraction: float = 0.1  # tail of the calibration text kept out of calibration, for search fitness
    eval_windows: Optional[int] = 40  # evaluation windows per dataset (null: the whole split, the papers' protocol)


@dataclass
class EvalConfig:
    """``eval=``: perplexity of the dense (cached across runs) and of the pruned model."""

    dense: bool = True
    batch_size: int = 1
    devices: Any = None  # null: device=; [cuda:0,cuda:1] or all: spread the blocks over several GPUs
    skip: bool = False  # true: no perplexity at all (eval=none)


# ---------------------------------------------------------------------------------------------------- pruners


@dataclass
class MagnitudeConfig:
    _target_: str = "msp.pruners.MagnitudePruner"


@dataclass
class WandaConfig:
    _target_: str = "msp.pruners.WandaPruner"


@dataclass
class SparseGPTConfig:
    """The defaults of :class:`msp.pruners.SparseGPTPruner`'s constructor (a test keeps the two equal)."""

    _target_: str = "msp.pruners.SparseGPTPruner"
    blocksize: int = 128  # columns per OBS block
    percdamp: float = 0.01  # dampening: fraction of mean diag(H) added to the diagonal
    saliency: str = "obs"  # obs (SparseGPT, w²/[H⁻¹]²) | isc (arXiv 2310.09499, w²·(H_jj + 1/[H⁻¹]²))
    bits: Optional[int] = None  # null, or 2/3/4/8: joint GPTQ-style quantization of the kept weights


# ---------------------------------------------------------------------------------------------------- allocations
# one schema per allocator; a key another allocator reads (allocation=owl allocation.beta=...) is an error


@dataclass
class UniformAllocation:
    method: str = "uniform"


@dataclass
class FileAllocation:
    method: str = "file"
    path: str = MISSING  # a previous run's allocation.json (or its run directory)


@dataclass
class FisherAllocation:
    method: str = "fisher"
    beta: float = 0.05  # sparsity change per standard deviation of log-sensitivity
    granularity: str = "layer"  # layer | block
    min: float = 0.0
    max: float = 0.99
    nsamples: Optional[int] = None  # calibration windows for the trace (null: all data.nsamples)
    normalize: bool = True  # divide each trace by the layer's parameter count


@dataclass
class HessianAllocation(FisherAllocation):
    method: str = "hessian"
    probes: int = 2  # Rademacher probes per window
    seed: Optional[int] = None  # probe seed (null: the run's seed)


@dataclass
class RankAllocation:
    method: str = "rank"
    signal: str = "hessian"  # hessian (Hutchinson trace) | fisher (empirical Fisher trace)
    alpha: float = 0.1  # half-width of the sparsity range around the target
    granularity: str = "layer"
    min: float = 0.0
    max: float = 0.99
    nsamples: Optional[int] = None
    normalize: bool = True
    probes: int = 2  # hessian only
    seed: Optional[int] = None  # hessian only


@dataclass
class AlphaAllocation:
    """AlphaPruning (Lu et al., NeurIPS 2024; data-free): heavier-tailed weight spectra (smaller Hill α) pruned less."""

    method: str = "alpha"
    epsilon: float = 0.2  # sparsity ratios in [1 - ε, 1 + ε] × target (the paper's Wanda/LLaMA-2 runs use 0.3)
    granularity: str = "block"  # block (mean α of a block's matrices; the paper's) | layer
    xmin_rule: str = "peak"  # peak | all | median: the λ_min candidates of the power-law fit
    bins: int = 100  # histogram bins of log10 λ for the "peak" rule
    min_eigenvalues: int = 16  # fewer non-zero eigenvalues: no spectrum to fit
    min_tail: int = 8  # eigenvalues every λ_min candidate leaves in the tail
    fallback: str = "error"  # error | mean: a matrix without a usable spectrum gets the mean α
    min: float = 0.0
    max: float = 0.99


@dataclass
class DlpAllocation:
    """DLP (Chen et al., ICML 2025): blocks with a higher mean Wanda score |W|·‖X‖₂ (dense inputs) pruned more."""

    method: str = "dlp"
    alpha: float = 0.15  # half-width of the sparsity band around the target
    reduction: str = "mean"  # mean | median (the paper's) of the block's Wanda scores
    granularity: str = "block"  # block only (the paper's unit)
    nsamples: Optional[int] = None  # calibration windows of the statistics pass (null: all data.nsamples)
    min: float = 0.0
    max: float = 0.99


@dataclass
class AtpAllocation:
    """ATP (Huang et al., ICML 2025): sparsity rising linearly with depth, s_i = t − β(L−1)/2 + β·i."""

    method: str = "atp"
    beta: Optional[float] = None  # null: chosen on beta_grid by the search's fitness on the held-out tail
    # [start, stop, step]; null: 0 … 0.03 in steps of 0.002, cut at the largest β whose ramp stays within [min, max]
    beta_grid: Optional[List[float]] = None
    granularity: str = "block"  # block only (the paper's unit)
    fitness: str = "kl"  # kl | ppl: the search's fitness (msp.search.fitness.ModelFitness)
    fitness_tokens: int = 512  # held-out calibration tokens scoring each β
    fitness_seqlen: int = 256
    fitness_batch_size: int = 4
    variant_nsamples: Optional[int] = 8  # calibration windows of the variant pass (null: all)
    min: float = 0.0
    max: float = 0.99


# OWL's option is called ``lambda`` (the paper's λ), a Python keyword: the dataclass is built from a namespace and
# without the generated methods that would spell ``self.lambda``; OmegaConf only reads its fields.
OwlAllocation = dataclass(init=False, repr=False, eq=False)(type("OwlAllocation", (), {
    "__doc__": "OWL: block sparsities in target ± lambda from the blocks' outlier ratios (scores above M × mean).",
    "__module__": __name__,
    "__annotations__": {"method": str, "lambda": float, "M": Union[int, float], "granularity": str, "min": float, "max": float},
    "method": "owl", "lambda": 0.08, "M": 5, "granularity": "block", "min": 0.0, "max": 0.99,
}))


# ---------------------------------------------------------------------------------------------------- eval, logger


@dataclass
class ZeroshotConfig:
    """lm-eval zero-shot tasks, in-process on the pruned model object; none by default (``zeroshot=none``), the
    papers' seven with ``zeroshot=paper``. With no tasks the other options are unused (and left out of the hash)."""

    tasks: List[str] = field(default_factory=list)  # any lm-eval task names
    num_fewshot: int = 0
    limit: Optional[int] = None  # examples per task (the first N); null: the whole split
    batch_size: int = 4  # lm-eval requests per forward
    max_length: Optional[int] = None  # null: the model's max_position_embeddings
    source: str = "auto"  # auto (hub if reachable, else embedded) | hub | embedded
    include_path: Optional[List[str]] = None  # extra folders of lm-eval task YAMLs
    mean_metric: str = "acc"  # results.json zeroshot.mean = mean of this metric over the tasks
    bootstrap_iters: int = 1000
    seed: int = 0
    dense: bool = False  # true: also score the dense model before pruning (cached) → results.json dense_zeroshot
    data_dir: str = "${cache_dir}/zeroshot"  # converted data (LAMBADA jsonl) reused across runs


@dataclass
class NoLogger:
    name: str = "none"


@dataclass
class WandbLogger:
    """Weights & Biases, offline by default (no network, no login; ``wandb sync`` later)."""

    name: str = "wandb"
    project: str = "msp"
    entity: Optional[str] = None
    mode: str = "offline"  # offline | online | disabled
    job_type: str = "prune"
    log_artifacts: bool = True  # allocation.json as a W&B artifact
    console: str = "off"  # off | auto | wrap


@dataclass
class ExportConfig:
    semi_structured: bool = False  # true: on a CUDA GPU, 2:4 layers become torch semi-structured tensors (needs pattern=2:4)
    quantized: bool = False  # true: write <run dir>/model-quantized (compressed-tensors pack-quantized; needs pruner=sparsegpt pruner.bits)


# ---------------------------------------------------------------------------------------------------- the run


@dataclass
class MspConfig:
    """The top level. Group nodes typed ``Any`` get their schema from the chosen option's file (one per option)."""

    model: ModelConfig = MISSING
    pruner: Any = MISSING
    allocation: Any = MISSING
    data: DataConfig = MISSING
    eval: EvalConfig = MISSING
    logger: Any = MISSING
    zeroshot: Any = MISSING
    export: ExportConfig = field(default_factory=ExportConfig)
    sparsity: float = 0.5  # target: parameter-weighted mean sparsity in [0, 1); a fixed N:M pattern sets it to 1 - N/M
    pattern: str = "unstructured"  # unstructured | N:M (2:4, 4:8, ...) | N:M with a literal N (N:8: per-layer N)
    seed: int = 0
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto (float32 on CPU, bf16 on GPU) | float32 | bfloat16 | float16
    batch_size: int = 4  # calibration windows per forward through a block
    true_sequential: bool = False  # prune each Linear inside its block's forward (later layers see pruned inputs)
    streaming: Union[bool, str] = "auto"  # auto | true (one block at a time on the device) | false
    gpu_budget_gb: Optional[Union[int, float]] = None  # device memory budget (GiB) for streaming; null: free memory
    save_model: bool = False  # also write the pruned model (safetensors, dense with zeros) to the run dir
    report: bool = True  # render summary.png and summary.md next to results.json (msp.report); never fails the run
    cache_dir: Optional[str] = "${oc.env:MSP_CACHE_DIR,${hydra:runtime.cwd}/.cache/msp}"  # shared by a sweep's jobs
    use_cache: bool = True
    skip_done: bool = False  # skip a job whose config hash matches a finished run (sweep dir, outputs/, done_dirs)
    done_dirs: List[str] = field(default_factory=list)
    experiment: str = "default"
    # an experiment that sweeps allocation=msp next to other allocators sets the search's generations here
    # (conf/allocation/msp.yaml reads it); unset otherwise. The config hash counts it as allocation.generations.
    search_generations: int = MISSING


#: group → option → schema, as registered (``conf/<group>/<option>.yaml`` lists ``schema_<option>`` first)
GROUP_SCHEMAS: dict[str, dict[str, Any]] = {
    "pruner": {"magnitude": MagnitudeConfig, "wanda": WandaConfig, "sparsegpt": SparseGPTConfig},
    "zeroshot": {"zeroshot": ZeroshotConfig},
    "logger": {"none": NoLogger, "wandb": WandbLogger},
}


def register_configs() -> None:
    """Put every schema into Hydra's ConfigStore: ``msp_schema`` (the top level, first in ``conf/config.yaml``),
    ``<group>/schema_<option>`` for the groups whose options have different keys, and ``allocation/schema_<method>``
    for every allocator of :data:`msp.allocation.registry.ALLOCATORS` (the search's schema imported from it)."""
    from hydra.core.config_store import ConfigStore

    from msp.allocation.registry import ALLOCATORS, load

    cs = ConfigStore.instance()
    cs.store(name="msp_schema", node=MspConfig)
    for group, options in GROUP_SCHEMAS.items():
        for option, schema in options.items():
            cs.store(group=group, name=f"schema_{option}", node=schema)
    for method, entry in ALLOCATORS.items():
        try:
            schema = load(entry.schema)
        except ImportError:  # an allocator whose package is not installed: allocation=<it> then fails to compose
            continue
        cs.store(group="allocation", name=f"schema_{method}", node=schema)


class UnknownKeyError(MspError):
    """A key that no schema has: Hydra's ``+key=value`` adds one that msp would silently ignore."""


def check_known_keys(cfg, path: str = "") -> None:
    """Every key of the composed config belongs to its node's schema. Hydra refuses ``data.nsample=4`` at compose
    time, but its own hint, ``+data.nsample=4``, adds the key to the node: msp would ignore it without a word."""
    from omegaconf import DictConfig, OmegaConf

    schema = OmegaConf.get_type(cfg)
    if schema is not None and is_dataclass(schema):
        known = {f.name for f in fields(schema)}
        extra = sorted(str(k) for k in cfg.keys() if k not in known)
        if extra:
            key = f"{path}.{extra[0]}" if path else extra[0]
            raise UnknownKeyError(
                f"{key} is not a key of {path or 'the top level'} ({schema.__name__}); valid: {', '.join(sorted(known))}. "
                f"Fix the spelling (a leading + only adds a key msp ignores)"
            )
    for k in cfg.keys():
        node = cfg._get_node(k)
        if isinstance(node, DictConfig):
            check_known_keys(node, f"{path}.{k}" if path else str(k))


__all__ = ["ModelConfig", "DataConfig", "EvalConfig", "MagnitudeConfig", "WandaConfig", "SparseGPTConfig", "UniformAllocation",
           "FileAllocation", "FisherAllocation", "HessianAllocation", "RankAllocation", "OwlAllocation", "AlphaAllocation",
           "DlpAllocation", "AtpAllocation",
           "ZeroshotConfig", "NoLogger", "WandbLogger", "ExportConfig", "MspConfig", "register_configs",
           "UnknownKeyError", "check_known_keys"]
