# Copyright MedAttnSlicer contributors. Apache-2.0.
"""``python -m sample_data [--data-dir D] [--organs liver spleen ...] [--images ...] [--force]``

Fetches and verifies the sample data, builds the datastore for the given organs (default: liver) and prints
where everything is. On failure prints one line ``sample_data: error: ...`` to stderr and exits 1.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from pathlib import Path

from .datastore import STUDY_IDS, build_datastore
from .fetch import fetch
from .paths import DATA_DIR_ENV


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sample_data",
        description="Fetch the TotalSegmentator/slicerio sample data and build a MONAI Label datastore.",
    )
    parser.add_argument(
        "--data-dir", type=Path, default=None, help=f"cache folder (default ${DATA_DIR_ENV} or <repo>/.data)"
    )
    parser.add_argument(
        "--organs", nargs="+", default=["liver"], help="TotalSegmentator structure names (default: liver)"
    )
    parser.add_argument(
        "--out-dir", type=Path, default=None, help="datastore folder (default <data>/datastore/<organs>)"
    )
    parser.add_argument("--images", nargs="+", default=None, choices=STUDY_IDS, help="subset of images (default: all)")
    parser.add_argument("--force", action="store_true", help="overwrite existing images and labels in the datastore")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        started = time.perf_counter()
        sample = fetch(args.data_dir)
        fetched = time.perf_counter()
        built = build_datastore(
            args.organs, args.out_dir, data_dir=sample.data_dir, image_ids=args.images, force=args.force
        )
        finished = time.perf_counter()
    except KeyboardInterrupt:
        print("sample_data: interrupted", file=sys.stderr)
        return 130
    except Exception as error:  # one readable line for any failure; the traceback is not useful to a user here
        message = " ".join(str(error).split()) or repr(error)
        print(f"sample_data: error: {type(error).__name__}: {message}", file=sys.stderr)
        return 1
    print(f"data dir:         {sample.data_dir}")
    print(f"reference files:  {sample.reference_files}")
    print(f"slicerio data:    {sample.slicerio_dir}")
    print(f"class maps:       {sample.class_maps_json}")
    print(f"datastore:        {built.path}")
    print(f"notes:            {built.notes_path}")
    print(f"label values:     {built.label_values}")
    print(f"images:           {', '.join(built.image_ids)}")
    print(f"labeled:          {', '.join(built.labeled_ids)}")
    print(f"time:             fetch/verify {fetched - started:.1f} s, datastore {finished - fetched:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
