"""``msp`` console script: compose the Hydra config (schemas: :mod:`msp.config`), check it once, run, print the summary."""
from __future__ import annotations

import json
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
    from msp.config import check_known_keys
    from msp.masks import Pattern
    from msp.run import ConfigError, RunSpec
    from msp.sweep import config_hash_of

    check_known_keys(cfg)  # a key added with + that no schema has (Hydra's compose refuses the others)
    pattern = Pattern.parse(cfg.pattern)
    sparsity = check_target(cfg.sparsity, "sparsity")
    if cfg.allocation.get("method") == "file" and pattern.kind != "nm" and typed_on_command_line("sparsity"):
        from msp.allocation.build import check_file_target

        check_file_target(OmegaConf.to_container(cfg.allocation, resolve=True), sparsity)  # a typed sparsity= the file would override
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
        bos_per_window=bool(cfg.model.bos_per_window), model_blocks=cfg.model.blocks,
        pruner=pruner, pruner_config=container(cfg.pruner), sparsity=sparsity, pattern=pattern, allocation=container(cfg.allocation),
        data=container(cfg.data), eval=container(cfg.eval), seed=cfg.seed, device=cfg.device, dtype=cfg.dtype, batch_size=cfg.batch_size,
        true_sequential=cfg.true_sequential, save_model=cfg.save_model, cache_dir=cfg.cache_dir or None, use_cache=cfg.use_cache,
        zeroshot=container(cfg.zeroshot), experiment=cfg.experiment, config_hash=config_hash_of(cfg), streaming=str(cfg.streaming).lower(),
        gpu_budget_gb=float(cfg.gpu_budget_gb) if cfg.gpu_budget_gb is not None else None, export=container(cfg.export),
        report=bool(cfg.report),
    )


def typed_on_command_line(key: str) -> bool:
    """Whether this job's overrides (the command line, or a sweep's values) set ``key`` (outside a Hydra app: no)."""
    if not HydraConfig.initialized():
        return False
    return any(str(o).lstrip("+~").split("=", 1)[0] == key for o in HydraConfig.get().overrides.task)


def user_errors() -> tuple[type[Exception], ...]:
    """msp's own error types (:class:`MspError`): printed as one line; anything else keeps its traceback."""
    return (MspError,)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def app(cfg: DictConfig) -> float | None:
    from msp.interrupt import stop_on_signals

    with stop_on_signals():  # SIGINT / SIGTERM: RunInterrupted, handled in _run_job (status.json, the resume line)
        return _run_job(cfg)


def _run_job(cfg: DictConfig) -> float | None:
    from msp.distributed import is_writer, quiet_logging
    from msp.interrupt import RunInterrupted, RunStatus, command_of_this_job
    from msp.results import summary_table
    from msp.run import run, validate_early
    from msp.tracking import make_tracker

    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    multirun = hydra_cfg.mode.name == "MULTIRUN"
    quiet_logging()  # several ranks (torchrun, SLURM): rank 0 alone logs to the file and reports
    if cfg.skip_done:
        from msp.sweep import skip_if_done

        if skip_if_done(cfg, run_dir):
            return None
    command, resume = command_of_this_job(list(hydra_cfg.overrides.task), multirun=multirun, run_dir=run_dir,
                                          sweep_dir=Path(hydra_cfg.sweep.dir) if multirun else None,
                                          search=OmegaConf.select(cfg, "allocation.method") == "msp")
    status = RunStatus(run_dir, command, resume, write=is_writer())
    status.running()
    tracker = None
    failed = True
    try:
        try:
            spec = spec_from_config(cfg)
            validate_early(spec)  # the one value check, before any weights are loaded
            tracker = make_tracker(OmegaConf.to_container(cfg.logger, resolve=True) if is_writer() else None)
            tracker.start(OmegaConf.to_container(cfg, resolve=True), run_dir, name=run_dir.name, group=spec.experiment,
                          tags=[spec.model, spec.pruner.name, str(spec.pattern), str(spec.allocation.get("method")), f"s{spec.sparsity}"])
            results = run(spec, run_dir, tracker, status=status)
            failed = False
        finally:
            if tracker is not None:
                tracker.finish(failed=failed)
    except RunInterrupted as exc:
        exc.sweep_dir = str(hydra_cfg.sweep.dir) if multirun else None
        _interrupted(exc, status, run_dir)
        raise
    except user_errors() as exc:  # msp's own errors are the user's to fix: one line; anything else is a bug: its traceback
        status.failed(str(exc))
        log.error("%s", exc)
        print(f"msp: error: {exc}", file=sys.stderr)
        print(f"msp: no results written; run directory: {run_dir}", file=sys.stderr)
        if multirun:
            raise
        sys.exit(2)
    except BaseException as exc:
        status.failed(f"{type(exc).__name__}: {exc}")
        raise
    status.done()
    if is_writer():
        print(summary_table(results))
        print(f"\nresults: {run_dir / 'results.json'}")
    return next(iter(results["ppl"].values()), None)


INFO_FLAGS = ("--help", "-h", "--hydra-help", "--info", "-i", "--cfg", "-c", "--shell-completion", "-sc", "--version")


def check_output_dir(argv: list[str]) -> None:
    """Hydra creates the run folder before msp runs and shows a traceback when it cannot: check it first (the folder
    named by hydra.run.dir / hydra.sweep.dir, else the default under outputs/) and fail with one line."""
    from msp.io import check_writable_dir

    if any(a.split("=", 1)[0] in INFO_FLAGS for a in argv):
        return  # Hydra prints something and writes nothing
    multirun = any(a in ("-m", "--multirun") for a in argv)
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    given = [a.split("=", 1)[1] for a in argv if a.lstrip("+").startswith(f"{key}=")]
    folder = given[-1].split("${", 1)[0] if given else "outputs"  # an interpolated tail (${now:...}) is made later
    try:
        check_writable_dir(folder or ".", key)
    except MspError as exc:
        print(f"msp: error: {exc}", file=sys.stderr)
        sys.exit(2)


def _interrupted(exc, status, run_dir: Path) -> None:
    """Mark the run interrupted (or done, when the signal came after results.json), say how to resume as the log's
    last line, and attach that line to the exception for :func:`main` to print last."""
    from msp.search.settings import STATE_FILE

    results = run_dir / "results.json"
    if results.exists() and results.stat().st_mtime >= status.started:  # only the summary files were left to write
        status.done()
        exc.resume = f"msp: interrupted by {exc.signal} after {results} was written: the run is complete"
        log.warning("%s", exc.resume.removeprefix("msp: "))
        return
    facts, where = {}, f"during {exc.stage}" if exc.stage else "before its first stage"
    state = run_dir / STATE_FILE
    if state.exists():
        try:
            facts["search_generation"] = int(json.loads(state.read_text())["generation"])
            where += f" (search checkpoint at generation {facts['search_generation']})"
        except (OSError, ValueError, KeyError):
            pass
    status.interrupted(exc, **facts)
    exc.resume = f"msp: interrupted by {exc.signal} {where}; no results written; resume with: {status.fields['resume']}"
    log.warning("%s", exc.resume.removeprefix("msp: "))


def main() -> None:
    from msp.distributed import quiet_other_ranks
    from msp.interrupt import RunInterrupted, stop_on_signals

    check_output_dir(sys.argv[1:])
    quiet_other_ranks(sys.argv)  # ranks other than 0: no .hydra/ copies of the config
    stopped = None
    with stop_on_signals():  # also between the jobs of a sweep and while Hydra composes
        try:
            app()
        except RunInterrupted as exc:
            stopped = exc.exit_code, _stop_line(exc)
    if stopped is not None:  # out of the except block: the unwound frames (and their progress bars) are gone
        code, line = stopped
        print(line, file=sys.stderr, flush=True)
        sys.exit(code)


def _stop_line(exc) -> str:
    """The process's last line: the run's resume line, or for a sweep the sweep's (a launcher's worker process only
    knows its own job)."""
    from msp.interrupt import sweep_resume_command

    sweep = sweep_resume_command(sys.argv, exc.sweep_dir)
    if sweep is None or (exc.resume or "").endswith(sweep):
        return exc.resume or f"msp: interrupted by {exc.signal} before any run started; nothing to resume: run the same command again"
    return f"msp: interrupted by {exc.signal}; the unfinished jobs have no results; resume with: {sweep}"


if __name__ == "__main__":
    main()
