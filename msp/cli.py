"""``msp`` console script: compose the Hydra config (schemas: :mod:`msp.config`), check it once, run, print the summary."""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from msp.distributed import quiet_progress

quiet_progress()  # before msp.config imports tqdm (through the search): ranks other than 0 draw no progress bars

from msp.config import register_configs  # noqa: E402
from msp.errors import MspError  # noqa: E402

log = logging.getLogger("msp")

CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")
register_configs()  # the schemas conf/ builds on, before Hydra composes anything


def spec_from_config(cfg: DictConfig):
    """Turn the composed config into a :class:`msp.run.RunSpec` (no weights loaded). A sparsity outside [0, 1) is
    an error; a fixed N:M pattern (``pattern=2:4``) sets the sparsity to 1 - N/M."""
    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from msp.allocation.budget import check_target
    from msp.masks import Pattern
    from msp.run import ConfigError, RunSpec
    from msp.sweep import config_hash_of

    pattern = Pattern.parse(cfg.pattern)
    sparsity = check_target(cfg.sparsity, "sparsity")
    if pattern.kind == "nm":
        if abs(pattern.fixed_sparsity() - sparsity) > 1e-9:
            log.info("pattern=%s fixes every layer at %.3f sparsity; sparsity=%s is replaced", pattern, pattern.fixed_sparsity(), sparsity)
        sparsity = pattern.fixed_sparsity()
    try:
        pruner = instantiate(cfg.pruner)
    except InstantiationException as exc:  # the constructor refused an option value (pruner.saliency=foo)
        if not isinstance(exc.__cause__, ValueError):
            raise
        raise ConfigError(str(exc.__cause__)) from None
    container = lambda node: OmegaConf.to_container(node, resolve=True)  # noqa: E731
    return RunSpec(
        model=cfg.model.name, model_revision=cfg.model.revision, model_loader=cfg.model.loader, max_seqlen=cfg.model.max_seqlen,
        bos_per_window=bool(cfg.model.bos_per_window),
        pruner=pruner, pruner_config=container(cfg.pruner), sparsity=sparsity, pattern=pattern, allocation=container(cfg.allocation),
        data=container(cfg.data), eval=container(cfg.eval), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
        true_sequential=cfg.true_sequential, save_model=cfg.save_model, cache_dir=cfg.cache_dir or None, use_cache=cfg.use_cache,
        zeroshot=container(cfg.zeroshot), experiment=cfg.experiment, config_hash=config_hash_of(cfg), streaming=str(cfg.streaming).lower(),
        gpu_budget_gb=float(cfg.gpu_budget_gb) if cfg.gpu_budget_gb is not None else None, export=container(cfg.export),
        report=bool(cfg.report),
    )


def user_errors() -> tuple[type[Exception], ...]:
    """msp's own error types (:class:`MspError`): printed as one line; anything else keeps its traceback."""
    return (MspError,)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from msp.distributed import is_writer, quiet_logging
    from msp.results import summary_table
    from msp.run import run, validate_early
    from msp.tracking import make_tracker

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    quiet_logging()  # several ranks (torchrun, SLURM): rank 0 alone logs to the file and reports
    if cfg.skip_done:
        from msp.sweep import skip_if_done

        if skip_if_done(cfg, run_dir):
            return None
    tracker = None
    failed = True
    try:
        spec = spec_from_config(cfg)
        validate_early(spec)  # the one value check, before any weights are loaded
        tracker = make_tracker(OmegaConf.to_container(cfg.logger, resolve=True) if is_writer() else None)
        tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, name=run_dir.name, group=spec.experiment,
                      tags=[spec.model, spec.pruner.name, str(spec.pattern), str(spec.allocation.get("method")), f"s{spec.sparsity}"])
        results = run(spec, run_dir, tracker)
        failed = False
    except user_errors() as exc:  # msp's own errors are the user's to fix: one line; anything else is a bug: its traceback
        log.error("%s", exc)
        print(f"msp: error: {exc}", file=sys.stderr)
        print(f"msp: no results written; run directory: {run_dir}", file=sys.stderr)
        if HydraConfig.get().mode.name == "MULTIRUN":
            raise
        sys.exit(2)
    finally:
        if tracker is not None:
            tracker.finish(failed=failed)
    if is_writer():
        print(summary_table(results))
        print(f"\nresults: {run_dir / 'results.json'}")
    return next(iter(results["ppl"].values()), None)


def main() -> None:
    from msp.distributed import quiet_other_ranks

    quiet_other_ranks(sys.argv)  # ranks other than 0: no .hydra/ copies of the config
    app()


if __name__ == "__main__":
    main()
