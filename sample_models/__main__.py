# Copyright MedAttnSlicer contributors. Apache-2.0.
"""``python -m sample_models [--jobs N] [NAME ...]``: train the small sample models not cached yet, N at a time.

Each model trains on one thread in its own process (pinned to the AVX2 class, see
:func:`~sample_models.trained_models.training_environment`), so one job per core trains the set in about
1 / cores of the time the tests would spend training them one after another as they first ask.
"""

from __future__ import annotations

import argparse
import os
import time

from sample_models.trained_models import CONFIGS, cache_dir, train_missing


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sample_models", description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"models to train (default: all of {sorted(CONFIGS)})")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="models trained at once (default: cores)")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs must be at least 1, got {args.jobs}")
    start = time.perf_counter()
    try:
        seconds = train_missing(args.names or None, jobs=args.jobs)
    except ValueError as err:
        parser.error(str(err))
    trained = [name for name, s in seconds.items() if s is not None]
    print(
        f"sample models in {cache_dir()}: {len(seconds) - len(trained)} cached, {len(trained)} trained "
        f"({time.perf_counter() - start:.0f} s with {args.jobs} job(s))"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
