"""Write a Kaggle Carvana submission: one run-length-encoded mask per test image.

The CSV has the header ``img,rle_mask`` and one row per image, its mask predicted at
the image's original size (1918x1280 for Carvana), encoded by ``unet_jax.rle`` as
Kaggle's Carvana evaluation defines it (``start length`` pairs of the foreground's
runs in row-major order, pixels numbered from 1; an empty mask is an empty string).
"""

from __future__ import annotations

import csv
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.submit --checkpoint RUN_DIR --input ~/carvana/test --output submission.csv
"""


def parse_args(argv=None):
    p = common.make_parser("experiments.submit", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--input", required=True, help="folder of test images (Kaggle's test/)")
    p.add_argument("--output", required=True, help="CSV file to write")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = check_output(Path(args.output))
    common.start_platform(args.platform, args)
    from tqdm import tqdm

    import data_pipeline
    from unet_jax.rle import rle_encode

    predictor = common.make_predictor(args)
    if predictor.config.num_classes != 1:
        raise common.UserError(f"--checkpoint {args.checkpoint}: a Carvana submission needs a "
                               "binary model (num_classes 1); Kaggle's run-length encoding "
                               "holds one mask per image")
    # Rows are keyed by the whole file name: e0.jpg and e0.png are two rows.
    every = data_pipeline.find_images(args.input, skip_bad=args.skip_bad, by_stem=False)
    paths = data_pipeline.check_images(every, skip_bad=args.skip_bad)
    for path in paths:  # before any prediction: the CSV is UTF-8
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise common.UserError(f"{ascii(str(path))}: its name is not valid UTF-8, which "
                                   "the submission's CSV cannot hold; rename the file") from None
    tmp = out.with_name(out.name + ".tmp")  # a crash never leaves a truncated CSV
    written = set()
    try:
        with tmp.open("w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["img", "rle_mask"])
            # disable=None: a progress bar on terminals only, not in logs or pipes.
            for path, _, mask in tqdm(predictor.predict_files(paths, skip_bad=args.skip_bad),
                                      total=len(paths), unit="image", disable=None):
                writer.writerow([path.name, rle_encode(mask)])
                written.add(path)
            # Kaggle refuses a submission that lacks a test image: a skipped one gets a
            # row with an empty mask, and the summary names it.
            empty = [path for path in every if path not in written]
            writer.writerows([path.name, ""] for path in empty)
        tmp.replace(out)
    except OSError as e:
        raise common.UserError(f"--output {out}: cannot write it ({e.strerror or e}); choose "
                               "a writable path") from None
    finally:
        tmp.unlink(missing_ok=True)
    print(f"wrote {len(every)} rows to {out}")
    if empty:
        names = ", ".join(path.name for path in empty[:10])
        more = f" and {len(empty) - 10} more" if len(empty) > 10 else ""
        print(f"{len(empty)} unreadable image(s) skipped, each written with an empty mask "
              f"so that Kaggle accepts the file: {names}{more}")
    return 0


def check_output(out: Path) -> Path:
    """``--output`` checked before any work (``common.check_output_file``). A
    submission saved again by pandas, a spreadsheet or an editor may end its lines
    with LF or start with a byte-order mark: still a submission, and replaced."""
    return common.check_output_file(out, "submission.csv", _is_submission,
                                    "a submission (its first line is not img,rle_mask)")


def _is_submission(path: Path) -> bool:
    try:
        with path.open("rb") as f:
            return f.readline(64).removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") == HEADER
    except OSError:
        return False


HEADER = b"img,rle_mask"  # the first line of every submission


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.submit")
