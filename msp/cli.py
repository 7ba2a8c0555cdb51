"""``msp`` console script: compose the Hydra config, call :func:`msp.run.run`, print the summary."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("msp")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


def spec_from_config(cfg: DictConfig):
    """Turn the composed config into a validated :class:`msp.run.RunSpec` (no weights loaded)."""
    from msp.masks import Pattern, PatternError
    from msp.run import ConfigError, RunSpec
    from msp.sweep import config_hash_of

    try:
        pattern = Pattern.parse(str(cfg.pattern))
    except PatternError as exc:
        raise ConfigError(str(exc)) from None
    sparsity = cfg.sparsity
    if pattern.kind == "nm":
        sparsity = pattern.fixed_sparsity()
    pruner_cfg = OmegaConf.to_container(cfg.pruner, resolve=True)
    try:
        pruner = instantiate(cfg.pruner)
    except Exception as exc:  # hydra wraps the constructor's ValueError
        cause = exc.__cause__ or exc
        raise ConfigError(str(cause)) from None
    container = lambda node: OmegaConf.to_container(node, resolve=True) if node is not None else None  # noqa: E731
    return RunSpec(
        model=str(cfg.model.name),
        model_revision=cfg.model.get("revision"),
        pruner=pruner,
        pruner_config=pruner_cfg,
        sparsity=float(sparsity) if isinstance(sparsity, (int, float)) else sparsity,
        pattern=pattern,
        allocation=container(cfg.allocation),
        data=container(cfg.data),
        eval=container(cfg.eval),
        seed=int(cfg.seed),
        device=str(cfg.device),
        dtype=str(cfg.dtype),
        batch_size=int(cfg.batch_size),
        true_sequential=bool(cfg.get("true_sequential", False)),
        save_model=bool(cfg.save_model),
        cache_dir=str(cfg.cache_dir) if cfg.cache_dir else None,
        use_cache=bool(cfg.use_cache),
        zeroshot=container(cfg.get("zeroshot")),
        experiment=str(cfg.get("experiment", "default")),
        config_hash=config_hash_of(cfg),
        streaming=str(cfg.get("streaming", "auto")).lower(),
        gpu_budget_gb=float(cfg.gpu_budget_gb) if cfg.get("gpu_budget_gb") is not None else None,
        export=container(cfg.get("export")),
    )


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from msp.allocation import AllocationError
    from msp.data import DataError
    from msp.device import DeviceError
    from msp.masks import PatternError
    from msp.models import ModelError
    from msp.run import ConfigError, run, summary_table
    from msp.tracking import make_tracker

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    if cfg.get("skip_done"):
        from msp.sweep import skip_if_done

        if skip_if_done(cfg, run_dir):
            return None
    tracker = None
    failed = True
    try:
        spec = spec_from_config(cfg)
        from msp.run import validate_early

        validate_early(spec)
        tracker = make_tracker(OmegaConf.to_container(cfg.logger, resolve=True))
        tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, name=run_dir.name, group=str(cfg.get("experiment", "default")),
                      tags=[spec.model, spec.pruner.name, str(spec.pattern), str(spec.allocation.get("method")), f"s{spec.sparsity}"])
        results = run(spec, run_dir, tracker)
        failed = False
    except (ConfigError, DataError, DeviceError, PatternError, ModelError, AllocationError, ValueError) as exc:
        log.error("%s", exc)
        print(f"msp: error: {exc}", file=sys.stderr)
        print(f"msp: no results written; run directory: {run_dir}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)
    finally:
        if tracker is not None:
            tracker.finish(failed=failed)
    print(summary_table(results))
    print(f"\nresults: {run_dir / 'results.json'}")
    first = next(iter(results["ppl"].values()), None)
    return first


def main() -> None:
    app()


if __name__ == "__main__":
    main()
