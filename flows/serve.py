"""Serve the SUM pipeline flow on a cron schedule against a real Prefect API (``PREFECT_API_URL``).

    python -m flows.serve --cron "0 3 * * *" --repo /path/to/checkout
"""

from __future__ import annotations

import argparse

from flows.pipeline import sum_pipeline


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--cron", default="0 3 * * *")
    p.add_argument("--repo", default=".")
    p.add_argument("--name", default="sum-nightly")
    a = p.parse_args(argv)
    sum_pipeline.serve(name=a.name, cron=a.cron, parameters={"repo": a.repo})


if __name__ == "__main__":
    main()
