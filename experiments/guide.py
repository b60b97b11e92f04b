"""Build the annotated guide: run docs/guide/guide.py cell by cell, write README and notebook.

``docs/guide/guide.py`` is the guide's one source, in the "percent" notebook format
that Jupytext, VS Code and Spyder read: a line ``# %% [markdown]`` starts a cell of
markdown written as comment lines, a line ``# %%`` starts a code cell; anything above
the first marker is a header and not part of the guide. This command executes the code
cells in order in one namespace, as a notebook kernel would, and writes:

    OUT/README.md     the guide for reading on GitHub: markdown, code, printed output,
                      figures; nothing needs to run to read it
    OUT/guide.ipynb   the same cells as a Jupyter notebook (nbformat 4), outputs and
                      figures embedded, ready to open in Jupyter or Colab and rerun
    OUT/figures/      every figure the cells saved, as PNG

Before the first cell the namespace holds ``SIZE`` ("tiny" or "full": the cells choose
small or real settings from it), ``FIGURES`` (the folder figures go to), ``RUNS`` (a
temporary folder for the training runs, removed afterwards) and ``PLATFORM``. A figure
is any file that appears or changes in ``FIGURES`` while a cell runs; it is shown after
that cell's printed output. Because every number and figure comes out of one run of the
project's own code, the guide cannot drift from the code: rebuild it after a change.

A cell that raises stops the build with one line naming the cell (its number, its line
in the source and its first line) and exit status 2, and OUT is left as it was: the
figures are written to a temporary folder and move into OUT only when every cell ran.
"""

from __future__ import annotations

import ast
import base64
import contextlib
import dataclasses
import io
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import textwrap
import time
import traceback
from pathlib import Path

from experiments import common

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "docs" / "guide" / "guide.py"

EXAMPLES = """
python -m experiments.guide                          # the full guide into docs/guide (15-20 min)
python -m experiments.guide --size tiny --out /tmp/guide   # every cell, tiny settings (~2 min)
"""

CELL_MARKER = re.compile(r"^# %%(?P<rest>.*)$")


@dataclasses.dataclass
class Cell:
    """One cell of the source: its kind, text and where it starts in the file."""

    kind: str  # "markdown" or "code"
    source: str
    line: int  # 1-based line of the cell's first content line in the source file
    output: str = ""
    figures: list = dataclasses.field(default_factory=list)  # paths, in saving order
    seconds: float = 0.0

    @property
    def first_line(self) -> str:
        """The cell's first line that is neither blank nor a comment, to name it by."""
        lines = [l.strip() for l in self.source.splitlines() if l.strip()]
        code = [l for l in lines if not l.startswith("#")]
        return (code or lines or [""])[0]


def parse_cells(text: str) -> list[Cell]:
    """The cells of a percent-format file, in order; empty cells are dropped.

    A markdown cell's lines lose their leading ``# `` (or a lone ``#``); a code
    cell's text is kept as written.
    """
    cells, kind, lines, start = [], None, [], 0

    def close():
        while lines and not lines[-1].strip():
            lines.pop()
        skip = 0
        while skip < len(lines) and not lines[skip].strip():
            skip += 1
        if kind is not None and lines[skip:]:
            cells.append(Cell(kind, "\n".join(lines[skip:]), start + skip))

    for number, line in enumerate(text.splitlines(), start=1):
        marker = CELL_MARKER.match(line)
        if marker:
            close()
            kind = "markdown" if "[markdown]" in marker["rest"] else "code"
            lines, start = [], number + 1
        elif kind == "markdown":
            lines.append(line[2:] if line.startswith("# ") else line.lstrip("#"))
        elif kind == "code":
            lines.append(line)
    close()
    return cells


class CellError(common.UserError):
    """A cell of the guide raised; the message names the cell."""


def _snapshot(folder: Path) -> dict:
    return {p: p.stat().st_mtime_ns for p in folder.glob("*.png")}


def _failure_line(error: BaseException, filename: str) -> int | None:
    """The line of the guide source where ``error`` was raised (its last frame there)."""
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == filename]
    return frames[-1].lineno if frames else None


def execute(cells: list[Cell], namespace: dict, figures: Path, filename: str,
            progress=sys.stderr, verbose: bool = False) -> None:
    """Runs the code cells in order in ``namespace``, recording each one's printed
    output, the figures it saved and its time. Raises CellError on the first failure.

    Each cell is compiled with its own line numbers in the source file, so that a
    traceback (and the one-line error) points into the guide itself. What a cell
    writes to stderr (progress bars, warnings) is not part of the guide: it is
    dropped, or passed through with ``verbose``.
    """
    code_cells = [c for c in cells if c.kind == "code"]
    for number, cell in enumerate(code_cells, start=1):
        before = _snapshot(figures)
        code = compile("\n" * (cell.line - 1) + cell.source, filename, "exec")
        out = io.StringIO()
        start, cpu_start = time.perf_counter(), time.process_time()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(
                    sys.stderr if verbose else io.StringIO()):
                exec(code, namespace)
        except Exception as e:  # noqa: BLE001: any failure of the guide's code stops it
            where = _failure_line(e, filename)
            at = f", failing at line {where}" if where and where != cell.line else ""
            detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CellError(
                f"code cell {number} (line {cell.line}: {cell.first_line[:60]!r}) raised "
                f"{type(e).__name__}{': ' + detail if detail else ''}{at}") from e
        finally:
            cell.seconds = time.perf_counter() - start
            cell.output = out.getvalue()
            _close_figures()
        after = _snapshot(figures)
        cell.figures = sorted((p for p in after if before.get(p) != after[p]), key=after.get)
        cpu = time.process_time() - cpu_start
        print(f"[{number:2}/{len(code_cells)}] {cell.seconds:6.1f} s ({cpu:6.1f} s CPU)  "
              f"{cell.first_line[:60]}", file=progress, flush=True)


def _close_figures() -> None:
    """Closes figures a cell left open, so that memory does not grow cell by cell."""
    if "matplotlib.pyplot" in sys.modules:
        sys.modules["matplotlib.pyplot"].close("all")


# --- Writing: README.md and guide.ipynb --------------------------------------------------

def _is_python_source(text: str) -> bool:
    """Whether a cell's output is quoted Python source (``inspect.getsource``), which
    reads better highlighted than as plain output."""
    stripped = textwrap.dedent(text).strip()
    if not stripped.startswith(("class ", "def ", "@")):
        return False
    try:
        ast.parse(stripped)
    except SyntaxError:
        return False
    return True


def _fence(text: str, language: str) -> str:
    """A fenced block that no backtick run inside ``text`` can close early."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    ticks = "`" * max(3, longest + 1)
    return f"{ticks}{language}\n{text.rstrip()}\n{ticks}"


def render_markdown(cells: list[Cell], footer: str, source: str = "docs/guide/guide.py") -> str:
    """The guide as GitHub markdown: each code cell, its output, then its figures (linked
    as ``figures/<name>.png``, beside the README)."""
    parts = [f"<!-- Generated by `python -m experiments.guide` from {source}: "
             "edit that file, then rebuild. -->"]
    for cell in cells:
        if cell.kind == "markdown":
            parts.append(cell.source)
            continue
        parts.append(_fence(cell.source, "python"))
        if cell.output.strip():
            language = "python" if _is_python_source(cell.output) else "text"
            parts.append(_fence(cell.output, language))
        for path in cell.figures:
            parts.append(f"![{path.stem}](figures/{path.name})")
    parts.append(footer)
    return "\n\n".join(parts) + "\n"


def _lines(text: str) -> list[str]:
    """Notebook JSON keeps multi-line strings as a list of lines, each with its newline."""
    return text.splitlines(keepends=True)


def render_notebook(cells: list[Cell], footer: str) -> dict:
    """The guide as an nbformat 4.5 notebook, outputs and figures (base64 PNG) embedded."""
    nb_cells, count = [], 0
    for index, cell in enumerate(cells):
        cell_id = f"cell-{index:03d}"
        if cell.kind == "markdown":
            nb_cells.append({"cell_type": "markdown", "id": cell_id, "metadata": {},
                             "source": _lines(cell.source)})
            continue
        count += 1
        outputs = []
        if cell.output:
            outputs.append({"output_type": "stream", "name": "stdout",
                            "text": _lines(cell.output)})
        for path in cell.figures:
            outputs.append({"output_type": "display_data", "metadata": {},
                            "data": {"image/png": base64.b64encode(path.read_bytes()).decode(),
                                     "text/plain": [f"<{path.name}>"]}})
        nb_cells.append({"cell_type": "code", "id": cell_id, "metadata": {},
                         "execution_count": count, "source": _lines(cell.source),
                         "outputs": outputs})
    nb_cells.append({"cell_type": "markdown", "id": "cell-footer", "metadata": {},
                     "source": _lines(footer)})
    return {"nbformat": 4, "nbformat_minor": 5, "cells": nb_cells,
            "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                        "language": "python"},
                         "language_info": {"name": "python",
                                           "version": platform.python_version()}}}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` shows it (Linux), else what Python knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


# --- The command ----------------------------------------------------------------------

def parse_args(argv=None):
    p = common.make_parser("experiments.guide", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--size", choices=("tiny", "full"), default="full",
                   help="'full': the guide's real runs (15-20 minutes on a 2-core CPU); "
                   "'tiny': every cell with tiny images and models, to check that it runs "
                   "(about 2 minutes, most of it compiling) (default: full)")
    p.add_argument("--out", default=str(ROOT / "docs" / "guide"),
                   help="folder for README.md, guide.ipynb and figures/ (default: docs/guide)")
    p.add_argument("--source", default=str(DEFAULT_SOURCE),
                   help="the percent-format source to run (default: docs/guide/guide.py)")
    p.add_argument("--verbose", action="store_true",
                   help="show what the cells write to stderr (progress bars, warnings)")
    common.add_platform_flag(p)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    source = Path(args.source)
    if not source.is_file():
        raise common.UserError(f"--source {source}: no such file")
    cells = parse_cells(source.read_text())
    if not any(c.kind == "code" for c in cells):
        raise common.UserError(f"--source {source}: no '# %%' code cells found")
    out_dir = Path(args.out)

    if args.size == "tiny" and "xla_backend_optimization_level" not in os.environ.get(
            "XLA_FLAGS", ""):
        # The quick check's programs are tiny and take far longer to compile than to run:
        # without XLA's backend optimisations they compile in about two thirds the time.
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
    common.start_platform(args.platform, args)
    start, load = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="unet-jax-guide-"))
    try:
        figures, runs = work / "figures", work / "runs"
        figures.mkdir()
        runs.mkdir()
        namespace = {"__name__": "__guide__", "SIZE": args.size, "FIGURES": figures,
                     "RUNS": runs, "PLATFORM": args.platform}
        execute(cells, namespace, figures, str(source.resolve()), verbose=args.verbose)
        seconds = time.perf_counter() - start
        publish(cells, figures, out_dir, args.size, source, seconds, load)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


def publish(cells: list[Cell], figures: Path, out_dir: Path, size: str, source: Path,
            seconds: float, load: float) -> None:
    """Writes README.md and guide.ipynb, and replaces OUT/figures with this build's."""
    times = os.times()  # this process and the benchmarks it ran, user and system
    cpu_seconds = times.user + times.system + times.children_user + times.children_system

    minutes, secs = divmod(round(seconds), 60)
    footer = (f"---\n\n*Built by `python -m experiments.guide --size {size}` in "
              f"{minutes} min {secs:02d} s ({cpu_seconds / 60:.1f} CPU-minutes) on "
              f"{cpu_name()} ({os.cpu_count()} cores, load average {load:.1f} at the start), "
              f"Python {platform.python_version()}, JAX {_version('jax')}, Flax "
              f"{_version('flax')}. Every number and figure above was computed in that run, "
              "except the table quoted from docs/benchmarks.md.*")
    try:
        shown_source = source.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown_source = str(source)
    notebook = json.dumps(render_notebook(cells, footer), indent=1, ensure_ascii=False) + "\n"
    out_figures = out_dir / "figures"
    out_figures.mkdir(parents=True, exist_ok=True)
    for stale in out_figures.glob("*.png"):  # a figure the guide no longer makes must go
        stale.unlink()
    for png in figures.glob("*.png"):
        shutil.copyfile(png, out_figures / png.name)
    _write_atomic(out_dir / "README.md", render_markdown(cells, footer, shown_source))
    _write_atomic(out_dir / "guide.ipynb", notebook)
    print(f"guide built in {minutes} min {secs:02d} s ({cpu_seconds / 60:.1f} CPU-minutes): "
          f"{out_dir / 'README.md'}, {out_dir / 'guide.ipynb'}, "
          f"{len(list(out_figures.glob('*.png')))} figures in {out_figures}")


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module)
    except Exception:  # noqa: BLE001: a version is decoration, never a failure
        return "?"


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.guide")
