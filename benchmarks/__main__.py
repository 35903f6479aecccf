"""``python -m benchmarks``: the speed suite (`benchmarks`), every benchmark against its reference
in the same run, on each model asked; prints a table and writes the figures and the machine's
description (load, CPUs, threads, versions, GPU) as JSON.

    python -m benchmarks --device cpu --model mobile_sam --threads 2
    python -m benchmarks --device cuda --model mobile_sam vit_b vit_h --out suite.json
    python -m benchmarks --smoke            # tiny random model, smallest sizes (under a minute)

Exit code 0 when every benchmark ran and every check passed, 1 when a check failed, 2 when a
benchmark raised (its error is in the JSON and on stderr; the others still run).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

from benchmarks import BENCHMARKS


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default=None, help="default: cuda when present, else cpu")
    p.add_argument("--model", nargs="+", default=None,
                   help="params/model/<name>.yaml names; default mobile_sam (cpu), mobile_sam vit_b vit_h (cuda), tiny (--smoke)")
    p.add_argument("--only", nargs="+", choices=BENCHMARKS, default=list(BENCHMARKS), help="run these benchmarks only")
    p.add_argument("--out", type=Path, default=None, help="JSON file (default outputs/benchmarks/suite-<device>.json)")
    p.add_argument("--threads", type=int, default=None, help="torch / OpenMP / MKL threads (default: min(8, CPUs); 1 with --smoke)")
    p.add_argument("--smoke", action="store_true", help="the smallest sizes (a dry run of the suite)")
    args = p.parse_args(argv)
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads {args.threads}: expected >= 1")
    return args


def set_threads(n: int) -> None:
    """Thread counts for OpenMP / MKL (read when torch loads, so before importing it) and torch."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    import torch

    torch.set_num_threads(n)


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    threads = args.threads or (1 if args.smoke else min(8, os.cpu_count() or 1))
    set_threads(threads)
    # torch and the library load only now, after the thread counts are set
    import torch

    from benchmarks.runner import print_table, run_suite, suite_sizes
    from benchmarks.common import machine_info

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print("python -m benchmarks: --device cuda: no CUDA device here", file=sys.stderr)
        return 2
    models = args.model or (["tiny"] if args.smoke else ["mobile_sam"] if device == "cpu" else ["mobile_sam", "vit_b", "vit_h"])
    sizes = suite_sizes("smoke" if args.smoke else device)
    machine = machine_info(device, threads)
    print(f"machine: {json.dumps(machine)}", flush=True)
    out = args.out or Path("outputs") / "benchmarks" / f"suite-{device}.json"
    out.parent.mkdir(parents=True, exist_ok=True)

    def save(results, errors, complete: bool) -> None:
        """The JSON so far: rewritten after every benchmark, so a run stopped by a timeout
        still leaves what it finished (``complete`` false)."""
        machine["loadavg_now"] = list(os.getloadavg())
        tmp = out.with_name(out.name + ".tmp")
        tmp.write_text(json.dumps({"machine": machine, "models": models, "smoke": args.smoke, "complete": complete,
                                   "sizes": {k: dataclasses.asdict(v) for k, v in sizes.items()},
                                   "results": [r.to_dict() for r in results], "errors": errors}, indent=2, default=str))
        tmp.replace(out)

    results, errors = run_suite(models, args.only, device, sizes, on_result=lambda r, e: save(r, e, False))
    save(results, errors, True)
    print_table(results)
    print(f"wrote {out}")
    if errors:
        for e in errors:
            print(f"{e['benchmark']} on {e['model']} failed: {e['error']}", file=sys.stderr)
        return 2
    return 0 if all(r.check.get("ok") for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
