# Copyright MedAttnSlicer contributors. Apache-2.0.
"""Segment a whole archive without a client: every image of a datastore (or the unlabelled ones, or a list) gets a
label file in an output folder.

    python -m monailabel_app.batch_infer --studies DIR_OR_DICOMWEB_URL --model sadnn_seg_int8 --out DIR \\
        [--images all|unlabeled|id1,id2] [--workers N] [--threads T] [--model-dir DIR]

A progress bar (tqdm) shows images done, failures and the ETA. Stopping it (Ctrl-C) and running the same command
again resumes: finished images are skipped, half-written outputs are done again. An image that cannot be segmented
is reported and skipped. ``<out>/batch_report.json`` lists what was done, skipped and failed. Exit status: 0 when
every selected image has its output, 1 when some failed, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

_REPO_ROOT = str(Path(__file__).resolve().parent.parent)
if _REPO_ROOT not in sys.path:
    sys.path.insert(0, _REPO_ROOT)

from monailabel_app.lib.batch.runner import REPORT_NAME, run_batch  # noqa: E402
from monailabel_app.lib.batch.sources import DatastoreSource  # noqa: E402

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m monailabel_app.batch_infer", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--studies",
        required=True,
        help="datastore: a folder of NIfTI/NRRD images, or a PACS DICOMweb URL (http://host/dicom-web)",
    )
    parser.add_argument("--model", required=True, help="served model name, e.g. sadnn_seg_int8")
    parser.add_argument("--out", required=True, help="output folder (<id>.nii.gz and <id>.json per image)")
    parser.add_argument(
        "--images", default="all", help="'all' (default), 'unlabeled' (no final label) or a comma list of image ids"
    )
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default 1)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads per worker (default cores/workers)")
    parser.add_argument("--model-dir", default=None, help="folder of trained weights (default: the server's)")
    parser.add_argument(
        "--datastore-opener",
        default=None,
        help="'package.module:function' returning the MONAI Label Datastore of --studies (e.g. a DICOMweb URL)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from tqdm import tqdm

    bar: tqdm | None = None
    failed = 0

    def on_start(total: int) -> None:
        nonlocal bar
        bar = tqdm(total=total, unit="image", desc=args.model, dynamic_ncols=True)

    def on_progress(image_id: str, seconds: float, error: str | None) -> None:
        nonlocal failed
        if error:
            failed += 1
            tqdm.write(f"skipped {image_id}: {error}")
        bar.set_postfix_str(f"{image_id} {seconds:.1f} s, {failed} failed")
        bar.update(1)

    try:
        report = run_batch(
            args.model,
            DatastoreSource(args.studies, args.datastore_opener),
            args.out,
            images=args.images,
            workers=args.workers,
            threads=args.threads,
            model_dir=args.model_dir,
            on_progress=on_progress,
            on_start=on_start,
        )
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    print(
        f"{len(report.done)} labelled, {len(report.skipped)} already done, {len(report.failed)} failed "
        f"({len(report.redone)} half-written outputs redone) in {report.seconds:.1f} s; "
        f"report: {Path(report.out) / REPORT_NAME}"
    )
    for image_id, reason in report.failed.items():
        print(f"  failed {image_id}: {reason}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())
