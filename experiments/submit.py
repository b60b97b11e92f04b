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

import collections
import contextlib
import csv
import dataclasses
import errno
import gzip
import io
import itertools
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from pathlib import Path

import data_pipeline
from data_pipeline.errors import DAMAGED_ARCHIVE
from data_pipeline.files import CARVANA_NAME
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
    predictor = common.make_predictor(args)
    if predictor.config.num_classes != 1:
        raise common.UserError(f"--checkpoint {args.checkpoint}: a Carvana submission needs a "
                               "binary model (num_classes 1); Kaggle's run-length encoding "
                               "holds one mask per image")
    # Rows are keyed by the whole file name: e0.jpg and e0.png are two rows.
    every = data_pipeline.find_images(args.input, skip_bad=args.skip_bad, by_stem=False)
    for path in every:  # before any prediction: the CSV is UTF-8, one row a line
        try:
            path.name.encode("utf-8")
        except UnicodeEncodeError:
            raise common.UserError(f"{ascii(str(path))}: its name is not valid UTF-8, which "
                                   "the submission's CSV cannot hold; rename the file") from None
        if "\n" in path.name or "\r" in path.name:
            raise common.UserError(f"{path!r}: its name holds a line break; rename the file")
    if sample is not None:
        every = _in_sample_order(every, sample, args.input)

    # What decides the masks, less the memory budget (half a GPU's memory, a quarter of
    # a host's), so that a resume on a machine of other memory continues the rows: at
    # most, photos whose whole pass exceeds its budget are tiled there, still the same
    # model's masks.
    mode = {k: v for k, v in dataclasses.asdict(predictor.mode).items() if k != "memory_budget"}
    partial = Partial(out, {"checkpoint": str(Path(args.checkpoint).resolve()),
                            "epoch": predictor.epoch, **mode})
    try:
        return _write(args, predictor, every, partial, out)
    finally:
        partial.release()  # the lock goes with the command (a caller's process goes on)


def _write(args, predictor, every, partial, out) -> int:
    """The rows of ``every``, after those ``partial`` holds already, then ``out``."""
    from unet_jax.progress import progress
    from unet_jax.rle import rle_encode

    done = partial.resume([path.name for path in every])
    todo = every[done:]
    skipped, sizes, warned = [], collections.Counter(), False
    start = time.perf_counter()
    try:
        good = set(data_pipeline.check_images(todo, skip_bad=args.skip_bad)) if todo else set()
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
                warned = _check_size(sizes, path, mask.shape, warned)
            for rest in pending:
                partial.write(rest.name, "")
                skipped.append(rest)
        partial.finish()
    except BaseException:
        partial.keep_or_remove(len(every))
        raise
    seconds = time.perf_counter() - start
    size = ", ".join(f"{w}x{h}" + (f" ({n:,})" if len(sizes) > 1 else "")
                     for (h, w), n in sizes.most_common(3)) or "none predicted"
    size += f" and {len(sizes) - 3} other sizes" if len(sizes) > 3 else ""
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


def _check_size(sizes: collections.Counter, path: Path, shape, warned: bool) -> bool:
    """Counts the masks' sizes, and warns (unless ``warned`` already) of a photo whose
    size is not Carvana's 1918x1280 (for Carvana's names) or not the first photo's:
    Kaggle decodes every row at one size, so a resized copy gives a row that decodes
    to nonsense without any error. Returns whether a warning was given."""
    shape = tuple(shape[:2])
    expected = CARVANA_SIZE if CARVANA_NAME.fullmatch(path.stem) else next(iter(sizes), None)
    sizes[shape] += 1
    if warned or expected is None or shape == expected:
        return warned
    log.warning("%s is %dx%d, not %dx%d like %s: Kaggle decodes every row at one size, so "
                "predict the test photos at their original size, not resized copies (the "
                "last line counts the sizes)", path.name, shape[1], shape[0], expected[1],
                expected[0], "Carvana's photos" if expected == CARVANA_SIZE else "the first")
    return True


CARVANA_SIZE = (1280, 1918)  # (height, width) of every photo of the challenge


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
    except (OSError, UnicodeDecodeError, *DAMAGED_ARCHIVE) as e:
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

    rows = 0  # written so far, those of an earlier command included

    def __init__(self, out: Path, settings: dict):
        # As the record reads back (tuples become lists), so that the two compare.
        self.out, self.settings = out, json.loads(json.dumps(settings))
        self.path = out.with_name(out.name + ".partial")
        self.info = out.with_name(out.name + ".partial.json")
        self.lock = out.with_name(out.name + ".partial.lock")

    def resume(self, names: list[str]) -> int:
        """How many of ``names`` (the rows in order) are written already; the file is
        cut back to its last complete row (a crash may have cut one short). Holds the
        partial file's lock from here to the end of the process: a second submit to the
        same --output (a job resubmitted while the first still runs) would append its
        rows to the same file."""
        import fcntl

        self._lock_fd = os.open(self.lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise common.UserError(
                f"--output {self.out}: another submit is writing it (its rows go to "
                f"{self.path.name}); wait for it to finish, or give another --output") from None
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
        # Line by line, the names alone: the rows of all 100,064 photos are about 1 GB,
        # and a speckled mask's row can be longer than the csv module takes a field.
        done = complete = 0
        with self.path.open("rb") as f:
            header = f.readline()
            if not header.endswith(b"\n"):  # a crash before the header was written
                self.path.unlink()
                return 0
            if header.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") != HEADER:
                raise common.UserError(
                    f"--output {self.out}: {self.path} is not a partial submission (its "
                    "first line is not img,rle_mask); remove it to start again")
            complete = len(header)
            for line in f:
                if not line.endswith(b"\n") or not line.strip():
                    break  # a row cut short by a crash: written again
                name = _first_field(line.decode("utf-8", "replace"))
                if done >= len(names) or name != names[done]:
                    raise common.UserError(
                        f"--output {self.out}: {self.path.name} holds rows of other images "
                        f"than --input's (row {done + 1}: {name}); remove {self.path} to "
                        "start again")
                done += 1
                complete += len(line)
        with self.path.open("r+b") as f:
            f.truncate(complete)
        self.rows = done
        return done

    @contextlib.contextmanager
    def open(self, done: int):
        """The partial file open for ``write``, after its ``done`` rows (created, with
        its header and its record, where there is none)."""
        from unet_jax import rundir

        self.rows = done
        if not self.path.exists():
            rundir.write_text_atomic(self.info, json.dumps(self.settings))
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
            if suffix in (".gz", ".zip"):
                # Level 6, gzip's own default: level 9 took over twice as long for a
                # file 1% smaller, minutes for the full test set.
                sys.stderr.write(f"submit: compressing {self.rows:,} rows into {self.out}\n")
            if suffix == ".gz":
                with self.path.open("rb") as src, tmp.open("wb") as raw, gzip.GzipFile(
                        self.out.stem, "wb", 6, raw) as dst:  # the name the header records
                    shutil.copyfileobj(src, dst, 1 << 20)
                tmp.replace(self.out)
            elif suffix == ".zip":
                member = self.out.stem if self.out.stem.endswith(".csv") else f"{self.out.stem}.csv"
                with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED, compresslevel=6) as z:
                    z.write(self.path, member)
                tmp.replace(self.out)
            else:
                self.path.replace(self.out)
        except OSError as e:
            self.said = True  # the error below says where the rows are
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            raise common.UserError(
                f"--output {self.out}: cannot write it ({e.strerror or e}); its {self.rows:,} "
                f"rows are kept in {self.path}: "
                f"{'free some space' if full else 'make its folder writable'} and run the "
                "same command again") from None
        finally:
            with contextlib.suppress(OSError):  # a read-only folder raises even for none
                tmp.unlink(missing_ok=True)  # Ctrl-C while compressing, too
        self._remove()

    def release(self) -> None:
        """Lets another command write to this --output."""
        if getattr(self, "_lock_fd", None) is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def _remove(self) -> None:
        for path in (self.path, self.info, self.lock):
            path.unlink(missing_ok=True)

    def keep_or_remove(self, total: int) -> None:
        """After a failure: rows written are kept, and said so; a file of none goes."""
        if not self.path.exists():
            self.lock.unlink(missing_ok=True)
            return
        if not self.rows:
            self._remove()
            return
        if not getattr(self, "said", False):
            sys.stderr.write(f"submit: {self.rows:,} of {total:,} rows kept in {self.path}; "
                             "the same command continues after them\n")


def _first_field(line: str) -> str:
    """The first field of a CSV line as csv.writer wrote it: quoted (its quotes
    doubled) where the name holds a comma or a quote."""
    if not line.startswith('"'):
        return line.split(",", 1)[0].rstrip("\r\n")
    end = 1
    while (end := line.index('"', end)) + 1 < len(line) and line[end + 1] == '"':
        end += 2
    return line[1:end].replace('""', '"')


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
    except (OSError, IndexError, *DAMAGED_ARCHIVE):
        return False
    return first.removeprefix(b"\xef\xbb\xbf").rstrip(b"\r\n") == HEADER


HEADER = b"img,rle_mask"  # the first line of every submission


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.submit")
