"""``sum <stage> [hydra overrides]``: read the config, call one library function, write outputs.

Without overrides a stage reads the composed ``params.yaml`` in the working directory, exactly as
``dvc repro`` runs it. With overrides (``model=vit_b``, ``eval.demo.max_images=2``) the config is
composed from ``params/`` the way ``dvc exp run -S`` does; ``--params FILE`` reads that file, which
must exist. ``sumseg params`` writes the composition to ``params.yaml`` (or ``--params FILE``).
Exit codes: 0 done, 2 bad input (one line naming the file or key), 130 / 143 stopped by SIGINT /
SIGTERM (one line; the next run resumes).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable

from sum.config import Config, ConfigError, compose, load_params
from sum.redact import RedactFilter, redact_text
from sum.progress import StageStopped
from sum.tracking import pipeline_parent

log = logging.getLogger("sum")

DEFAULT_PARAMS = "params.yaml"
REDACT_LOGS = RedactFilter()


def _config(args: argparse.Namespace) -> Config:
    """The stage's config: ``--params`` when given (it must exist), else ``params.yaml`` when
    present and there are no overrides, else ``params/`` composed with the overrides."""
    overrides = [] if args.stage == "pull" else args.overrides  # pull's positional is the model URI
    if args.stage == "params":  # --params is what it writes
        return compose(overrides, config_dir=args.config_dir)
    if args.params is not None:
        if not Path(args.params).is_file():
            raise FileNotFoundError(f"--params {args.params}: file not found")
        if overrides:
            raise ConfigError(f"--params {args.params}: overrides {overrides} apply to params/ (--config-dir), "
                              "not to a composed params file; edit the file or drop --params")
        return load_params(args.params)
    if overrides or not Path(DEFAULT_PARAMS).is_file():
        return compose(overrides, config_dir=args.config_dir)
    return load_params(DEFAULT_PARAMS)


def cmd_params(cfg: Config, args: argparse.Namespace) -> None:
    """Write the composition of ``params/`` to ``params.yaml`` (what DVC stages read), as
    ``dvc exp run`` composes it (`sum.config.params_yaml_text`)."""
    from sum.config import params_yaml_text
    from sum.io import atomic_write_text

    out = args.params or DEFAULT_PARAMS
    atomic_write_text(out, params_yaml_text(args.overrides, args.config_dir))
    log.info("wrote %s", out)


def cmd_acquire(cfg: Config, args: argparse.Namespace) -> None:
    from sum.data.acquire import acquire
    from sum.io import S3Options

    acquire(cfg.data.acquire, s3=S3Options.from_config(cfg.storage.s3))


def cmd_realbench(cfg: Config, args: argparse.Namespace) -> None:
    from sum.data.realbench import build_real_benchmarks_from_config

    build_real_benchmarks_from_config(cfg.data)


def cmd_photos(cfg: Config, args: argparse.Namespace) -> None:
    from sum.data.photos import build_photo_pool

    name = cfg.data.photos.source
    if name not in cfg.data.acquire.sources:
        raise ValueError(f"data.photos.source={name!r}: not in data.acquire.sources {sorted(cfg.data.acquire.sources)}")
    raw = Path(cfg.data.acquire.out_dir) / name
    build_photo_pool(raw, cfg.data.photos.out_dir, package=cfg.data.acquire.sources[name].package)


def cmd_oracle_pool(cfg: Config, args: argparse.Namespace) -> None:
    from sum.pseudo.oracle import write_oracle_pool

    write_oracle_pool(cfg, args.out or "data/pseudo_oracle", args.oracle, args.min_area)


def cmd_oracle_uncertainty(cfg: Config, args: argparse.Namespace) -> None:
    from sum.uncertainty.oracle import write_oracle_uncertainty

    write_oracle_uncertainty(cfg, args.out or "data/uncertainty_oracle")


def cmd_finetune(cfg: Config, args: argparse.Namespace) -> None:
    from sum.train.trainer import finetune

    finetune(cfg, args.method)


def cmd_recipe(cfg: Config, args: argparse.Namespace) -> None:
    """Choose the fine-tuning recipe on the validation split; print it as overrides."""
    from sum.eval.recipe import choose_recipe, recipe_overrides

    print(" ".join(recipe_overrides(choose_recipe(cfg)["chosen"])))


def cmd_validate(cfg: Config, args: argparse.Namespace) -> None:
    from sum.data.validate import validate_config

    validate_config(cfg.data, out=args.out or "metrics/validate.json", skip_list=cfg.data.validate.skip_list)


def cmd_pull(cfg: Config, args: argparse.Namespace) -> None:
    from sum.registry.pull import pull

    if len(args.overrides) != 1 or not args.out:
        raise SystemExit("sumseg pull: usage: sumseg pull models:/<name>@<alias> --out FILE [--format sum|sam]")
    pull(args.overrides[0], args.out, args.format, tracking=cfg.tracking.uri)


def cmd_export_sam(cfg: Config, args: argparse.Namespace) -> None:
    from sum.io import S3Options
    from sum.model.export import export_sam

    if not args.src or not args.out:
        raise SystemExit("sumseg export-sam: --src SUM_CHECKPOINT and --out SAM_STATE_DICT are required")
    export_sam(args.src, args.out, sha256=args.sha256, s3=S3Options.from_config(cfg.storage.s3))
    log.info("wrote %s", args.out)


# The stages that are one library call on the whole config, as "module:function". A stage's module is
# imported when the stage runs: importing them all (torch, MLflow) would cost every command seconds.
CONFIG_STAGES = {
    "world": "sum.data.synthetic:run_world",
    "embed": "sum.model.embed:run_embed",
    "pseudolabel": "sum.pseudo.run:pseudolabel",
    "refine": "sum.uncertainty.refine:run_refine",
    "uncertainty": "sum.uncertainty.stage:run_uncertainty",
    "uncertainty-report": "sum.uncertainty.report:run_uncertainty_report",
    "demo": "sum.eval.demo:run_demo",
    "evaluate": "sum.eval.evaluate:run_evaluate",
    "seeds": "sum.eval.seeds:run_seeds",
    "register": "sum.registry.register:register",
}


STAGES: dict[str, Callable[[Config, argparse.Namespace], None]] = {
    "params": cmd_params,
    "acquire": cmd_acquire,
    "realbench": cmd_realbench,
    "photos": cmd_photos,
    "validate": cmd_validate,
    "oracle-pool": cmd_oracle_pool,
    "oracle-uncertainty": cmd_oracle_uncertainty,
    "finetune": cmd_finetune,
    "recipe": cmd_recipe,
    "pull": cmd_pull,
    "export-sam": cmd_export_sam,
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sumseg", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=sorted({*STAGES, *CONFIG_STAGES}), help="what to run")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. model=vit_b train.lr=1e-4 (pull: the models:/ URI)")
    p.add_argument("--params", help="composed params file to read (must exist; default: params.yaml when present, "
                   "else params/ composed); params: the file to write")
    p.add_argument("--config-dir", default=None, help="Hydra config dir (default: the repo's params/)")
    p.add_argument("--src", help="export-sam: SUM checkpoint (path, s3:// or https://)")
    p.add_argument("--sha256", help="export-sam: expected sha256 of --src")
    p.add_argument("--out", help="export-sam: output SAM state dict; validate: report path; oracle-pool: shard folder "
                   "(default data/pseudo_oracle); oracle-uncertainty: map folder (default data/uncertainty_oracle); pull: the checkpoint file to write")
    p.add_argument("--format", default="sum", help="pull: sum (SUM checkpoint) | sam (plain SAM state dict)")
    p.add_argument("--oracle", default="gt", help="oracle-pool: what the pool holds, gt | matched | add-parts (sum.pseudo.oracle; default gt)")
    p.add_argument("--min-area", type=float, default=0.0, help="oracle-pool --oracle add-parts: smallest added part, as a fraction of the image")
    p.add_argument("--method", help="finetune: the method to train (params/method/<name>.yaml; default: the config's)")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


# stages that compute something: each logs an MLflow child run under the pipeline's parent run
TRACKED_STAGES = frozenset(
    {"world", "pseudolabel", "refine", "uncertainty", "uncertainty-report", "finetune", "evaluate", "seeds", "register"}
)


def main(argv: list[str] | None = None) -> int:
    """Run one stage. Exit 0 on success; 2 with one line naming the file or key on bad input
    (config, files, values); 128 + the signal (130 SIGINT, 143 SIGTERM) with one line when a signal
    stops the stage (`sum.progress.StageStopped`). Log lines and the error line pass through
    `sum.redact.redact_text`: no URL password or signature reaches the log."""
    args = build_parser().parse_intermixed_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        handler.addFilter(REDACT_LOGS)
    # no MLflow usage reports from pipeline stages (they run offline, and the reporting thread
    # must not cross the world stage's fork); MLFLOW_DISABLE_TELEMETRY=false opts back in
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    parent, status = None, "FAILED"
    try:
        cfg = _config(args)
        if args.stage in TRACKED_STAGES:
            parent = pipeline_parent(cfg.tracking, extra=args.overrides)
        if args.stage in CONFIG_STAGES:
            module, function = CONFIG_STAGES[args.stage].split(":")
            getattr(importlib.import_module(module), function)(cfg)
        else:
            STAGES[args.stage](cfg, args)
        status = "FINISHED"
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as e:
        # one clear line, naming the file or key, is what the user needs; tracebacks with -v
        if args.verbose:
            raise
        print(f"sumseg {args.stage}: error: {redact_text(str(e))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:  # StageStopped (the stage's own stop) or a plain Ctrl-C
        status = "KILLED"
        if args.verbose:
            raise
        stopped = e if isinstance(e, StageStopped) else StageStopped("stopped by SIGINT", signal.SIGINT)
        print(f"sumseg {args.stage}: {redact_text(str(stopped))}", file=sys.stderr)
        return stopped.exit_code
    finally:
        if parent is not None:
            parent.finish(status)
    return 0


if __name__ == "__main__":
    sys.exit(main())
