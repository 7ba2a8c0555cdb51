"""Re-runnable sweeps: a run's config hash, and finding a finished run with the same hash (``skip_done=true``).

The hash covers the resolved config minus the keys that only say where outputs, caches and logs go, so the
same experiment launched from another sweep directory, with another cache folder or logger, counts as done.
Hydra's own ``hydra:`` node is never part of the composed job config.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any, Iterable

log = logging.getLogger(__name__)

#: dotted keys that do not change a run's numbers: where things are written, how they are logged
OUTPUT_ONLY_KEYS = ("cache_dir", "use_cache", "skip_done", "done_dirs", "logger", "experiment", "zeroshot.data_dir", "report",
                    "allocation.dist_timeout_s")
#: options added after runs were recorded, at the value that reproduces the earlier behaviour: dropped from the hash
#: at that value, so finished runs still count as done; any other value is part of the hash as usual
NEUTRAL_DEFAULTS = {"true_sequential": False, "eval.devices": None, "eval.skip": False, "export.quantized": False,
                    "allocation.store_budget_gb": None, "model.bos_per_window": False,
                    "model.blocks": None, "allocation.fitness_blockwise": True, "allocation.fitness_memory_gb": 2.0,
                    "allocation.final": "prune", "allocation.verify_tokens": None,
                    "allocation.verify": "rerank",  # session 7's verification (verify_tokens=N) re-ranked
                    "allocation.store_inputs": "dense"}
#: facts about ``model.name`` carried by the ``model=`` entries (msp.config.ModelConfig), added after runs were
#: recorded: they follow from the name and do not change a run's numbers
MODEL_FACTS = ("model.loader", "model.max_seqlen", "model.licence")
#: an experiment's search budget; earlier configs carried it as ``allocation.generations`` on every allocation
#: (the other allocators ignored it), so it is hashed there
SEARCH_GENERATIONS = "search_generations"
RESULTS = "results.json"
SKIPPED = "skipped.json"


def _drop(tree: dict, dotted: str) -> None:
    *parents, leaf = dotted.split(".")
    node: Any = tree
    for p in parents:
        node = node.get(p) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(leaf, None)


def _drop_unused_zeroshot_options(tree: dict) -> None:
    """Without zero-shot tasks the other ``zeroshot.*`` options are unused; those at their schema default are left
    out (earlier ``zeroshot=none`` configs had only ``tasks``, plus what an experiment overlay set)."""
    from dataclasses import fields

    from msp.config import ZeroshotConfig

    node = tree.get("zeroshot")
    if not isinstance(node, dict) or node.get("tasks"):
        return
    defaults = {f.name: getattr(ZeroshotConfig(), f.name) for f in fields(ZeroshotConfig)}
    for key in [k for k in node if k != "tasks" and k in defaults and node[k] == defaults[k]]:
        del node[key]


def _drop_unused_verify_options(tree: dict) -> None:
    """Without a verification (``allocation.verify_tokens=null``) ``allocation.verify`` does nothing: left out."""
    node = tree.get("allocation")
    if isinstance(node, dict) and "verify_tokens" in node and node["verify_tokens"] is None:
        node.pop("verify", None)


def _drop_unset_survivors(tree: dict) -> None:
    """The search's last stage has no survivors: the schema (msp.search.settings.StageConfig) writes
    ``survivors: null`` where the earlier YAML wrote nothing."""
    stages = (tree.get("allocation") or {}).get("stages") if isinstance(tree.get("allocation"), dict) else None
    for stage in stages if isinstance(stages, list) else []:
        if isinstance(stage, dict) and "survivors" in stage and stage["survivors"] is None:
            del stage["survivors"]


def _unset_resume(tree: dict) -> None:
    """``allocation.resume`` / ``resume_from`` say how a search was continued, not what it computes (a resumed search
    ends where the uninterrupted one does): hashed at their defaults, so a resumed run counts as the same run."""
    alloc = tree.get("allocation")
    if isinstance(alloc, dict):
        for key, default in (("resume", False), ("resume_from", None)):
            if key in alloc:
                alloc[key] = default


def config_hash(config: dict) -> str:
    """sha256 (first 16 hex digits) of the resolved config as canonical JSON, minus :data:`OUTPUT_ONLY_KEYS`."""
    tree = json.loads(json.dumps(config, default=str))
    tree.pop("hydra", None)
    for key in (*OUTPUT_ONLY_KEYS, *MODEL_FACTS):
        _drop(tree, key)
    generations = tree.pop(SEARCH_GENERATIONS, None)
    if generations not in (None, "???") and isinstance(tree.get("allocation"), dict):
        tree["allocation"].setdefault("generations", generations)
    _drop_unused_zeroshot_options(tree)
    _drop_unused_verify_options(tree)
    _drop_unset_survivors(tree)
    _unset_resume(tree)
    for key, neutral in NEUTRAL_DEFAULTS.items():
        *parents, leaf = key.split(".")
        node: Any = tree
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node and node[leaf] == neutral:
            del node[leaf]
    return hashlib.sha256(json.dumps(tree, sort_keys=True).encode()).hexdigest()[:16]


def config_hash_of(cfg) -> str:
    """:func:`config_hash` of a composed ``DictConfig``; output-only keys are dropped before resolving, so their
    interpolations (``cache_dir`` → ``${hydra:runtime.cwd}``) need no Hydra context."""
    from omegaconf import OmegaConf, open_dict

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))  # plain nodes: a schema's keys cannot be deleted
    with open_dict(cfg):
        for key in OUTPUT_ONLY_KEYS:
            *parents, leaf = key.split(".")
            node = OmegaConf.select(cfg, ".".join(parents)) if parents else cfg
            if node is not None and leaf in node:
                del node[leaf]
        cfg.pop("hydra", None)
    return config_hash(OmegaConf.to_container(cfg, resolve=True))


def skip_if_done(cfg, run_dir: Path) -> bool:
    """``skip_done=true``: when a finished run with this config's hash exists, say where and return True.

    Looks in the current sweep folder (or the run folder), ``outputs/`` under the launch folder, and ``done_dirs``.
    The skipped job's folder gets a ``skipped.json`` pointing at the existing result (the table builder follows it).
    """
    from msp.io import write_json_atomic

    from hydra.core.hydra_config import HydraConfig

    digest = config_hash_of(cfg)
    run_dir = Path(run_dir)
    here = run_dir
    if HydraConfig.initialized() and HydraConfig.get().mode.name == "MULTIRUN":
        here = Path(HydraConfig.get().sweep.dir)
    roots = [here, Path.cwd() / "outputs", *(Path(p).expanduser() for p in cfg.get("done_dirs") or [])]
    done = find_finished_run(digest, roots)
    if done is None:
        return False
    log.info("skip_done: config %s already finished: %s", digest, done)
    if done.parent.resolve() != run_dir.resolve():
        write_json_atomic(run_dir / SKIPPED, {"config_hash": digest, "existing": str(done.resolve())})
    return True


def iter_results(roots: Iterable[Path]) -> Iterable[Path]:
    seen: set[Path] = set()
    for root in roots:
        root = Path(root)
        if not root.is_dir():
            continue
        for path in sorted(root.rglob(RESULTS)):
            real = path.resolve()
            if real not in seen and "wandb" not in path.relative_to(root).parts:  # W&B keeps a copy
                seen.add(real)
                yield path


def finished_results(roots: Iterable[Path]) -> list[Path]:
    """Every ``results.json`` under ``roots`` plus the earlier runs that ``skip_done`` pointed a job at
    (``skipped.json``), each once, resolved: what a table or a sweep plot reads."""
    found: dict[Path, None] = {p.resolve(): None for p in iter_results(roots)}
    for root in roots:
        root = Path(root)
        for marker in sorted(root.rglob(SKIPPED)) if root.is_dir() else []:
            try:
                target = Path(json.loads(marker.read_text())["existing"])
            except (OSError, ValueError, KeyError):
                log.warning("cannot read %s; ignoring it", marker)
                continue
            if target.is_file():
                found[target.resolve()] = None
            else:
                log.warning("%s points at %s, which no longer exists", marker, target)
    return list(found)


def find_finished_run(digest: str, roots: Iterable[Path]) -> Path | None:
    """The first ``results.json`` under ``roots`` whose ``config_hash`` is ``digest`` (unreadable files skipped)."""
    for path in iter_results(roots):
        try:
            if json.loads(path.read_text()).get("config_hash") == digest:
                return path
        except (OSError, ValueError):
            log.warning("skip_done: cannot read %s; ignoring it", path)
    return None
