"""Write a Kaggle Carvana submission: one run-length-encoded mask per test image.

The CSV has the header ``img,rle_mask`` and one row per image, its mask predicted at
the image's original size (1918x1280 for Carvana), encoded by ``unet_jax.rle`` as
Kaggle's Carvana evaluation defines it (``start length`` pairs of the foreground's
runs in row-major order, pixels numbered from 1; an empty mask is an empty string).

Kaggle's ``sample_submission.csv`` (or ``.csv.zip``, as Kaggle ships it), found beside
or in the test folder, is the list of rows Kaggle expects: the rows follow its order,
and a test image it names that the folder lacks stops the command before any
prediction (a partly unzipped ``test.zip`` would give a file Kaggle rejects).

Carvana's 100,064 test photos take hours, so the rows are written as they come to
``<output>.partial``: a command stopped by Ctrl-C, a time limit or a crash keeps
them, and the same command again continues after the last finished row. The file
becomes ``--output`` only when every row is there: plain, or compressed where the
name ends in ``.gz`` or ``.zip`` (Kaggle takes both; the CSV is about 1 GB plain).
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import itertools
import json
import logging
import shutil
import sys
import time
import zipfile
from pathlib import Path

from experiments import common

log = logging.getLogger(__name__)

EXAMPLES = """
python -m experiments.submit --checkpoint RUN_DIR --input ~/carvana/test --output submission.csv
python -m experiments.submit --checkpoint RUN_DIR --input ~/carvana/test --output submission.csv.gz --tta hflip
"""

SAMPLE_NAMES = ("sample_submission.csv", "sample_submission.csv.zip")


def parse_args(argv=None):
    p = common.make_parser("experiments.submit", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_checkpoint_flags(p)
    p.add_argument("--input", required=True, help="folder of test images (Kaggle's test/)")
    p.add_argument("--output", required=True,
                   help="CSV file to write; a name ending in .gz or .zip is compressed")
    p.add_argument("--sample-submission", metavar="CSV",
                   help="Kaggle's sample_submission.csv (or .csv.zip): the images the "
                   "submission must hold, in its order; 'none' writes the folder's images "
                   "in name order unchecked (default: sample_submission.csv or .csv.zip "
                   "beside --input or in it, where there is one)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    out = check_output(Path(args.output))
    sample = _sample_file(args)
    common.start_platform(args.platform, args)
    import data_pipeline
    from unet_jax.progress import progress
    from unet_jax.rle import rle_encode

    predictor = common.make_predictor(args)
    if predictor.config.num_classes != 1:
        raise common.UserError(f"--checkpoint {args.checkpoint}: a Carvana submission needs a "
                               "binary model (num_classes 1); Kaggle's run-length encoding "
                               "holds one mask per image")
    # Rows are keyed by the whole file name: e0.jpg and e0.png are two rows.
    every = data_pipeline.find_images(args.input, skip_bad=args.skip_bad, by_stem=False)
    for path in every:  # before any prediction: the CSV is UTF-8
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise common.UserError(f"{ascii(str(path))}: its name is not valid UTF-8, which "
                                   "the submission's CSV cannot hold; rename the file") from None
    if sample is not None:
        every = _in_sample_order(every, sample, args.input)
    good = set(data_pipeline.check_images(every, skip_bad=args.skip_bad))

    partial = Partial(out, {"checkpoint": str(Path(args.checkpoint).resolve()),
                            "epoch": predictor.epoch, "prediction": predictor.describe()})
    done = partial.resume([path.name for path in every])
    todo = every[done:]
    skipped, sizes = [], {}
    start = time.perf_counter()
    try:
        with partial.open(done):
            pending = iter(todo)
            results = predictor.predict_files([p for p in todo if p in good],
                                              skip_bad=args.skip_bad)
            for path, _, mask in progress(results, len(todo), desc="submit"):
                # Kaggle refuses a submission that lacks a test image: one skipped as
                # unreadable gets a row with an empty mask, in its place.
                for earlier in itertools.takewhile(lambda p: p != path, pending):
                    partial.write(earlier.name, "")
                    skipped.append(earlier)
                partial.write(path.name, rle_encode(mask))
                _check_size(sizes, path, mask.shape)
            for rest in pending:
                partial.write(rest.name, "")
                skipped.append(rest)
        partial.finish()
    except BaseException:
        partial.keep_or_remove(len(every))
        raise
    seconds = time.perf_counter() - start
    size = ", ".join(f"{w}x{h}" for h, w in sizes) or "none predicted"
    again = f", {done:,} of them from {partial.path.name}" if done else ""
    print(f"wrote {len(every):,} rows to {out}{again} (masks of {size}; {predictor.describe()}; "
          f"epoch {predictor.epoch} of {args.checkpoint}; {len(todo) - len(skipped):,} "
          f"predicted in {seconds:.0f} s)")
    if skipped:
        names = ", ".join(path.name for path in skipped[:10])
        more = f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""
        print(f"{len(skipped)} unreadable image(s) skipped, each written with an empty mask "
              f"so that Kaggle accepts the file: {names}{more}")
    return 0


def _check_size(sizes: dict, path: Path, shape) -> None:
    """Warns once when a mask's size differs from the first's: Kaggle decodes every row
    at one size (1918x1280 for Carvana), so a test folder of resized copies gives rows
    that decode to nonsense without any error."""
    shape = tuple(shape[:2])
    if shape not in sizes:
        if sizes:
            (first, name), = list(sizes.items())[:1]
            log.warning("%s is %dx%d, %s %dx%d: Kaggle decodes every row at one size, so "
                        "predict the test images at their original size (not resized "
                        "copies)", path.name, shape[1], shape[0], name, first[1], first[0])
        sizes[shape] = path.name


def _sample_file(args) -> Path | None:
    """The sample submission to follow: ``--sample-submission``, or the one beside or
    in the ``--input`` folder; None for 'none' or where there is none."""
    if args.sample_submission is not None:
        if args.sample_submission.lower() == "none":
            return None
        path = Path(args.sample_submission)
        if not path.is_file():
            raise common.UserError(f"--sample-submission {path}: no such file; give Kaggle's "
                                   "sample_submission.csv (or .csv.zip), or 'none'")
        return path
    folder = Path(args.input)
    for where in (folder.parent, folder):
        for name in SAMPLE_NAMES:
            if (where / name).is_file():
                return where / name
    return None


def _sample_names(path: Path) -> list[str]:
    """The first column of a sample submission, below its ``img`` header."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                members = [m for m in z.namelist() if m.endswith(".csv")]
                if len(members) != 1:
                    raise common.UserError(f"--sample-submission {path}: the zip holds "
                                           f"{len(members)} CSV files, not one")
                text = z.read(members[0]).decode("utf-8-sig")
        else:
            text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError, zipfile.BadZipFile) as e:
        raise common.UserError(f"--sample-submission {path}: cannot read it ({e}); give "
                               "Kaggle's sample_submission.csv, or 'none'") from None
    rows = list(csv.reader(io.StringIO(text)))
    if not rows or not rows[0] or rows[0][0] != "img":
        raise common.UserError(f"--sample-submission {path}: its first column is not 'img'; "
                               "give Kaggle's sample_submission.csv, or 'none'")
    return [row[0] for row in rows[1:] if row]


def _in_sample_order(images: list[Path], sample: Path, given) -> list[Path]:
    """``images`` in the sample submission's order. An image it names that ``images``
    lack stops the command; images it does not name are left out, with a warning."""
    names = _sample_names(sample)
    by_name = {path.name: path for path in images}
    missing = [name for name in names if name not in by_name]
    if missing:
        first = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        raise common.UserError(
            f"--input {given} lacks {len(missing):,} of the {len(names):,} images "
            f"{sample.name} names ({first}), and Kaggle refuses a submission without them: "
            "give the whole test folder (unzip all of test.zip), or --sample-submission "
            "none to write the folder's images alone")
    listed = set(names)
    extra = [path.name for path in images if path.name not in listed]
    if extra:
        log.warning("%d image(s) of --input are not in %s and get no row: %s%s", len(extra),
                    sample.name, ", ".join(extra[:5]), ", ..." if len(extra) > 5 else "")
    return [by_name[name] for name in dict.fromkeys(names)]


class Partial:
    """The rows written so far, ``<output>.partial``, with what made them beside it
    (``<output>.partial.json``): the run, its epoch and how it predicted. A later
    command with the same settings continues after its last complete row; one with
    other settings is refused rather than mixing two models' rows in one file."""

    def __init__(self, out: Path, settings: dict):
        self.out, self.settings = out, settings
        self.path = out.with_name(out.name + ".partial")
        self.info = out.with_name(out.name + ".partial.json")

    def resume(self, names: list[str]) -> int:
        """How many of ``names`` (the rows in order) are written already; the file is
        cut back to its last complete row (a crash may have cut one short)."""
        if not self.path.exists():
            return 0
        try:
            earlier = json.loads(self.info.read_text())
        except (OSError, ValueError):
            raise common.UserError(
                f"--output {self.out}: {self.path} is there, but not the record of how it "
                f"was made ({self.info.name}); remove it to start again") from None
        if earlier != self.settings:
            changed = ", ".join(f"{k} {earlier.get(k)!r}, not {v!r}"
                                for k, v in self.settings.items() if earlier.get(k) != v)
            raise common.UserError(
                f"--output {self.out}: {self.path.name} holds rows predicted with other "
                f"settings ({changed}); give those settings to continue it, or remove "
                f"{self.path} (and {self.info.name}) to start again")
        # Line by line: the rows of all 100,064 photos are about 1 GB.
        done = complete = 0
        with self.path.open("rb") as f:
            for line in f:
                if not line.endswith(b"\n"):
                    break  # a row cut short by a crash: written again
                row = next(csv.reader([line.decode("utf-8", "replace")]), [""])
                if complete == 0:
                    if row != ["img", "rle_mask"]:
                        break
                elif done >= len(names) or row[0] != names[done]:
                    raise common.UserError(
                        f"--output {self.out}: {self.path.name} holds rows of other images "
                        f"than --input's (row {done + 1}: {row[0]}); remove {self.path} to "
                        "start again")
                else:
                    done += 1
                complete += len(line)
        if complete == 0:  # not even the header: nothing to continue
            self.path.unlink()
            self.info.unlink(missing_ok=True)
            return 0
        with self.path.open("r+b") as f:
            f.truncate(complete)
        return done

    @contextlib.contextmanager
    def open(self, done: int):
        """The partial file open for ``write``, after its ``done`` rows (created, with
        its header and its record, where there is none)."""
        self.rows = done
        if not self.path.exists():
            self.info.write_text(json.dumps(self.settings))
            with self.path.open("w", newline="") as f:
                csv.writer(f).writerow(["img", "rle_mask"])
        with self.path.open("a", newline="") as self._file:
            self._writer = csv.writer(self._file)
            yield self

    def write(self, name: str, rle: str) -> None:
        self._writer.writerow([name, rle])
        self._file.flush()  # a row finished is a row kept, whatever stops the command
        self.rows += 1

    def finish(self) -> None:
        """The partial file becomes ``--output``, compressed as its name asks."""
        suffix = self.out.suffix.lower()
        tmp = self.out.with_name(self.out.name + ".tmp")  # no half-written output, ever
        try:
            if suffix == ".gz":
                with self.path.open("rb") as src, gzip.open(tmp, "wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.replace(self.out)
            elif suffix == ".zip":
                member = self.out.stem if self.out.stem.endswith(".csv") else f"{self.out.stem}.csv"
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as z:
                    z.write(self.path, member)
                tmp.replace(self.out)
            else:
                self.path.replace(self.out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise common.UserError(
                f"--output {self.out}: cannot write it ({e.strerror or e}); its {self.rows:,} "
                f"rows are kept in {self.path}: free some space or choose another --output, "
                "and run the command again") from None
        self.path.unlink(missing_ok=True)
        self.info.unlink(missing_ok=True)

    def keep_or_remove(self, total: int) -> None:
        """After a failure: rows written are kept, and said so; a file of none goes."""
        if not self.path.exists():
            return
        if not getattr(self, "rows", 0):
            self.path.unlink(missing_ok=True)
            self.info.unlink(missing_ok=True)
            return
        sys.stderr.write(f"submit: {self.rows:,} of {total:,} rows kept in {self.path}; the "
                         "same command continues after them\n")


def check_output(out: Path) -> Path:
    """``--output`` checked before any work (``common.check_output_file``). A
    submission saved again by pandas, a spreadsheet or an editor may end its lines
    with LF or start with a byte-order mark: still a submission, and replaced."""
    if out.suffix.lower() in (".7z", ".bz2", ".xz", ".zst", ".tar", ".tgz", ".rar"):
        raise common.UserError(f"--output {out}: give a name ending in .csv, .csv.gz or "
                               ".csv.zip (compressed as its name says)")
    return common.check_output_file(out, "submission.csv", _is_submission,
                                    "a submission (its first line is not img,rle_mask)")


def _is_submission(path: Path) -> bool:
    try:
        if path.suffix.lower() == ".gz":
            with gzip.open(path, "rb") as f:
                first = f.readline(64)
        elif path.suffix.lower() == ".zip":
            with zipfile.ZipFile(path) as z, z.open(z.namelist()[0]) as f:
                first = f.readline(64)
        else:
            with path.open("rb") as f:
                first = f.readline(64)
    except (OSError, EOFError, IndexError, zipfile.BadZipFile):
        return False
    return first.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") == HEADER


HEADER = b"img,rle_mask"  # the first line of every submission


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.submit")
