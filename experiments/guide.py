"""Build the annotated guide: run docs/guide/guide.py in a Jupyter kernel, write README and notebook.

``docs/guide/guide.py`` is the guide's one source, in the "percent" notebook format
that Jupytext, VS Code and Spyder read: a line ``# %% [markdown]`` starts a cell of
markdown written as comment lines, a line ``# %%`` starts a code cell; anything above
the first marker is a header and not part of the guide. jupytext reads it into a
notebook; nbclient runs the code cells in order in a Jupyter kernel (ipykernel, with
this Python, in the current folder), which captures what each prints and displays; and
this command writes:

    OUT/README.md     the guide for reading on GitHub: markdown, code, printed output,
                      figures; nothing needs to run to read it
    OUT/guide.ipynb   the executed notebook (nbformat), outputs and figures embedded,
                      ready to open in Jupyter or Colab and rerun
    OUT/figures/      every figure the cells saved, as PNG

A hidden first cell, not published, sets the names the cells read: ``SIZE`` ("tiny" or
"full": the cells choose small or real settings from it), ``FIGURES`` (the folder
figures go to), ``RUNS`` (a temporary folder for the training runs, removed afterwards)
and ``PLATFORM``. The guide's first code cell gives them defaults, so the published
notebook runs top to bottom as it is. A figure is a PNG a cell saves in ``FIGURES`` and
displays (the guide's ``save``); the README links it where it was displayed. What the
cells write to stderr (progress bars, warnings) is left out. Because every number and
figure comes out of one run of the project's own code, the guide cannot drift from the
code: rebuild it after a change.

A cell that raises stops the build with one line naming the cell (its number, its line
in the source and its first line) and exit status 2, and OUT is left as it was: the
figures are written to a temporary folder and move into OUT only when every cell ran.
"""

from __future__ import annotations

import ast
import base64
import dataclasses
import os
import platform
import re
import shutil
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from experiments import common

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SOURCE = ROOT / "docs" / "guide" / "guide.py"

EXAMPLES = """
python -m experiments.guide                          # the full guide into docs/guide (4-20 min)
python -m experiments.guide --size tiny --out /tmp/guide   # every cell, tiny settings (~2 min)
"""

# A percent-format cell marker at the top of the file means the file has no header
# (the start of jupytext's own marker pattern).
STARTS_WITH_MARKER = re.compile(r"\s*#\s*%%")
# Where an IPython traceback points into a cell: "Cell In[4], line 6".
CELL_FRAME = re.compile(r"Cell In\[(\d+)\], line (\d+)")
ANSI_CODE = re.compile(r"\x1b\[[0-9;]*m")


class CellError(common.UserError):
    """A cell of the guide raised; the message names the cell."""


@dataclasses.dataclass
class Guide:
    """The guide's notebook, and for each code cell (by index) the line of the source
    file where its first line with text is, so that an error can point into the file."""

    notebook: object  # nbformat.NotebookNode
    starts: dict[int, int]

    def code_cells(self) -> list[int]:
        return [i for i, c in enumerate(self.notebook.cells) if c.cell_type == "code"]


def read_source(text: str) -> Guide:
    """The guide in ``text`` (percent format) as a notebook, read by jupytext.

    The header above the first marker is dropped, and the cells get stable ids
    (``cell-000``, ...), so that a rebuild changes no more of guide.ipynb than its
    outputs. jupytext keeps each code cell's text as written, which is how its line
    in the file is found.
    """
    import jupytext

    notebook = jupytext.reads(text, fmt="py:percent")
    if not STARTS_WITH_MARKER.match(text):
        del notebook.cells[0]
    notebook.metadata = {}  # jupytext's notes on the text format; the notebook gets its own
    starts, position = {}, 0
    for index, cell in enumerate(notebook.cells):
        cell.id = f"cell-{index:03d}"
        cell.metadata = {k: v for k, v in cell.metadata.items()
                         if k not in ("lines_to_next_cell", "lines_to_end_of_cell_marker")}
        code = cell.source.lstrip("\n")
        if cell.cell_type == "code" and code.strip():
            found = text.find(code, position)
            if found >= 0:
                starts[index] = text.count("\n", 0, found) + 1
                position = found + len(code)
    return Guide(notebook, starts)


def first_line(source: str) -> str:
    """A cell's first line that is neither blank nor a comment, to name it by."""
    lines = [l.strip() for l in source.splitlines() if l.strip()]
    code = [l for l in lines if not l.startswith("#")]
    return (code or lines or [""])[0]


# --- Running: a Jupyter kernel, cell by cell ----------------------------------------------

def setup_source(size: str, figures: Path, runs: Path, platform_name: str,
                 compile_cache: str | None) -> str:
    """The hidden first cell: the names the guide's cells read, and JAX's platform and
    compilation cache started in the kernel as every command does (the kernel, not this
    process, runs JAX: a GPU is taken once, by the process that uses it)."""
    return textwrap.dedent(f"""\
        import pathlib as _pathlib, types as _types
        from experiments import common as _common

        SIZE, PLATFORM = {size!r}, {platform_name!r}
        FIGURES, RUNS = _pathlib.Path({str(figures)!r}), _pathlib.Path({str(runs)!r})
        _common.start_platform(PLATFORM, _types.SimpleNamespace(compile_cache={compile_cache!r}))
        """)


class Progress:
    """nbclient's cell hooks: a line on stderr for each cell that ran, and with
    ``verbose`` what it wrote to stderr. nbclient counts the setup cell as cell 0."""

    def __init__(self, guide: Guide, verbose: bool = False):
        self.numbers = {index + 1: n for n, index in enumerate(guide.code_cells(), start=1)}
        self.verbose, self.current, self.started = verbose, None, 0.0

    def on_cell_execute(self, cell, cell_index):
        self.current, self.started = cell_index, time.perf_counter()

    def on_cell_executed(self, cell, cell_index, execute_reply):
        if self.verbose:
            sys.stderr.writelines(o.text for o in cell.outputs if o.get("name") == "stderr")
        if cell_index in self.numbers and execute_reply["content"]["status"] == "ok":
            print(f"[{self.numbers[cell_index]:2}/{len(self.numbers)}] "
                  f"{time.perf_counter() - self.started:6.1f} s  "
                  f"{first_line(cell.source)[:60]}", file=sys.stderr, flush=True)


def execute(guide: Guide, setup: str, verbose: bool = False) -> None:
    """Runs the setup cell, then the guide's code cells in order, in one new kernel;
    the outputs are stored in ``guide.notebook``. Raises CellError on the first failure.

    The kernel is ipykernel's ``python3``, which runs this process's Python, in the
    current folder, with this process's environment (XLA flags included)."""
    import nbformat
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError, DeadKernelError

    notebook, progress = guide.notebook, Progress(guide, verbose)
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3 (ipykernel)",
                                       "language": "python"}
    notebook.cells.insert(0, nbformat.v4.new_code_cell(setup, id="setup"))
    client = NotebookClient(
        notebook, timeout=None, kernel_name="python3", record_timing=False,
        coalesce_streams=True, resources={"metadata": {"path": os.getcwd()}},
        # The kernel's own notes (it warns that it talks over local TCP) are not the guide's.
        extra_arguments=["--IPKernelApp.log_level=ERROR"],
        on_cell_execute=progress.on_cell_execute, on_cell_executed=progress.on_cell_executed)
    try:
        client.execute()
    except (CellExecutionError, DeadKernelError) as e:
        del notebook.cells[0]
        raise CellError(describe_failure(guide, progress.current - 1, e)) from e
    del notebook.cells[0]
    for cell in notebook.cells:  # numbered from 1, as if the setup cell had not run
        if cell.cell_type == "code" and cell.execution_count:
            cell.execution_count -= 1


def describe_failure(guide: Guide, index: int, error: Exception) -> str:
    """One line for the failed cell at ``index`` (-1: the setup cell): its number, line
    and first line in the source, the exception, and where it was raised if elsewhere."""
    name = getattr(error, "ename", type(error).__name__)
    evalue = str(getattr(error, "evalue", error)).strip()
    detail = f": {evalue.splitlines()[0]}" if evalue else ""
    if index < 0:  # a flag the kernel cannot honour (--platform, --compile-cache)
        return evalue if name == "UserError" else f"the setup cell raised {name}{detail}"
    source, line = guide.notebook.cells[index].source, guide.starts.get(index)
    where = failing_line(guide, getattr(error, "traceback", ""))
    at = f", failing at line {where}" if where and where != line else ""
    return (f"code cell {guide.code_cells().index(index) + 1} (line {line}: "
            f"{first_line(source)[:60]!r}) raised {name}{detail}{at}")


def failing_line(guide: Guide, traceback: str) -> int | None:
    """The line of the source file where the error was raised, from the traceback's
    last frame in a cell: "Cell In[k], line j" is line j, counted from its first line
    with text, of the k-th cell run: the setup cell, then each code cell with code."""
    frames = CELL_FRAME.findall(ANSI_CODE.sub("", traceback))
    ran = [i for i in guide.code_cells() if guide.notebook.cells[i].source.strip()]
    if not frames or not 2 <= int(frames[-1][0]) <= len(ran) + 1:
        return None
    count, line = map(int, frames[-1])
    start = guide.starts.get(ran[count - 2])
    return start + line - 1 if start is not None else None


# --- Writing: README.md and guide.ipynb --------------------------------------------------

def name_figures(notebook, figures: Path) -> dict:
    """The file in ``figures`` that each displayed PNG is, keyed by (cell index, output
    index): the guide's ``save`` displays the file it wrote, byte for byte. A PNG that
    no file matches (a figure shown but not saved) is written there under a name of its
    own, so that the README can link every figure."""
    saved = {png.read_bytes(): png.name for png in sorted(figures.glob("*.png"))}
    names = {}
    for index, cell in enumerate(notebook.cells):
        for number, output in enumerate(cell.get("outputs", [])):
            if "image/png" not in output.get("data", {}):
                continue
            data = base64.b64decode(output.data["image/png"])
            if data not in saved:
                saved[data] = f"cell-{index:03d}-{number}.png"
                (figures / saved[data]).write_bytes(data)
            names[index, number] = saved[data]
    return names


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


def render_output(output, figure: str | None) -> str | None:
    """One output as markdown: printed text fenced, a figure linked beside the README."""
    if figure is not None:
        return f"![{Path(figure).stem}](figures/{figure})"
    if output.output_type == "stream":
        text = output.text
    else:
        text = output.get("data", {}).get("text/plain", "")
    if not text.strip():
        return None
    return _fence(text, "python" if _is_python_source(text) else "text")


def render_markdown(notebook, figure_names: dict, footer: str,
                    source: str = "docs/guide/guide.py") -> str:
    """The guide as GitHub markdown: each code cell, then its outputs in order.

    nbconvert's MarkdownExporter is not used: it indents outputs instead of fencing
    them (so quoted library source is not highlighted), and it extracts figures again
    as output_N_M.png beside the names the guide gave them."""
    parts = [f"<!-- Generated by `python -m experiments.guide` from {source}: "
             "edit that file, then rebuild. -->"]
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type != "code":
            parts.append(cell.source)
            continue
        parts.append(_fence(cell.source, "python"))
        for number, output in enumerate(cell.outputs):
            rendered = render_output(output, figure_names.get((index, number)))
            if rendered:
                parts.append(rendered)
    parts.append(footer)
    return "\n\n".join(parts) + "\n"


def publishable(notebook) -> None:
    """Leaves out of the notebook what the cells wrote to stderr (progress bars,
    warnings): they are the build's, not the guide's."""
    for cell in notebook.cells:
        if cell.cell_type == "code":
            cell.outputs = [o for o in cell.outputs if o.get("name") != "stderr"]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def cpu_name() -> str:
    """The CPU's model name as ``lscpu`` shows it (Linux), else what Python knows."""
    from experiments.benchmark import machine_info

    return machine_info()["cpu"]


# --- The command ----------------------------------------------------------------------

def parse_args(argv=None):
    p = common.make_parser("experiments.guide", __doc__.split("\n\n")[0], EXAMPLES)
    p.add_argument("--size", choices=("tiny", "full"), default="full",
                   help="'full': the guide's real runs (4-20 minutes on a 2-core CPU); "
                   "'tiny': every cell with tiny images and models, to check that it runs "
                   "(about 2 minutes, most of it compiling) (default: full)")
    p.add_argument("--out", default=str(ROOT / "docs" / "guide"),
                   help="folder for README.md, guide.ipynb and figures/ (default: docs/guide)")
    p.add_argument("--source", default=str(DEFAULT_SOURCE),
                   help="the percent-format source to run (default: docs/guide/guide.py)")
    p.add_argument("--verbose", action="store_true",
                   help="show what the cells write to stderr (progress bars, warnings), "
                   "after each cell")
    common.add_platform_flag(p)
    return p.parse_args(argv)


def _check_tools() -> None:
    """The build's tools are the optional extra ``guide``; without them, say so in a line."""
    import importlib.util

    missing = [m for m in ("jupytext", "nbclient", "nbformat", "ipykernel")
               if importlib.util.find_spec(m) is None]
    if missing:
        raise common.UserError(f"building the guide needs {', '.join(missing)}: "
                               "pip install -e '.[guide]'")


def main(argv=None):
    args = parse_args(argv)
    _check_tools()
    source = Path(args.source)
    if not source.is_file():
        raise common.UserError(f"--source {source}: no such file")
    guide = read_source(source.read_text())
    if not guide.code_cells():
        raise common.UserError(f"--source {source}: no '# %%' code cells found")
    out_dir = Path(args.out)
    check_out(out_dir)

    if args.size == "tiny" and "xla_backend_optimization_level" not in os.environ.get(
            "XLA_FLAGS", ""):
        # The quick check's programs are tiny and take far longer to compile than to run:
        # without XLA's backend optimisations they compile in about two thirds the time.
        # The kernel inherits this process's environment.
        os.environ["XLA_FLAGS"] = " ".join(
            [os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0"]).strip()
    start, load = time.perf_counter(), os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="unet-jax-guide-"))
    try:
        figures, runs = work / "figures", work / "runs"
        figures.mkdir()
        runs.mkdir()
        setup = setup_source(args.size, figures, runs, args.platform, args.compile_cache)
        execute(guide, setup, verbose=args.verbose)
        seconds = time.perf_counter() - start
        publish(guide.notebook, figures, out_dir, args.size, source, seconds, load)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


FIGURE_NAME = re.compile(r"cell-\d{3}-\d+\.png")  # name_figures' names
BUILT_BY = "*Built by `python -m experiments.guide"  # the footer of what it writes


def check_out(out_dir: Path) -> None:
    """``--out`` checked before the build: a file, or a folder holding a README.md or
    guide.ipynb the guide did not write (it replaced them, and removed the folder's
    figures), is refused in one line; its own earlier build is replaced."""
    from unet_jax import rundir

    if out_dir.exists() and not out_dir.is_dir():
        raise common.UserError(f"--out {out_dir} is a file; give a folder for README.md, "
                               "guide.ipynb and figures/")
    for name in ("README.md", "guide.ipynb"):
        path = out_dir / name
        try:
            ours = not path.exists() or BUILT_BY in path.read_text(errors="replace")
        except OSError:
            ours = False
        if not ours:
            raise common.UserError(f"--out {out_dir} holds a {name} the guide did not write; "
                                   "give a new or empty folder")
    rundir.check_writable(out_dir, "--out")


def publish(notebook, figures: Path, out_dir: Path, size: str, source: Path,
            seconds: float, load: float) -> None:
    """Writes README.md and guide.ipynb, and replaces OUT/figures with this build's."""
    import nbformat

    # This process and its children once ended: the kernel, and the benchmarks it ran.
    times = os.times()
    cpu_seconds = times.user + times.system + times.children_user + times.children_system

    minutes, secs = divmod(round(seconds), 60)
    footer = (f"---\n\n{BUILT_BY} --size {size}` in "
              f"{minutes} min {secs:02d} s ({cpu_seconds / 60:.1f} CPU-minutes) on "
              f"{cpu_name()} ({os.cpu_count()} cores, load average {load:.1f} at the start), "
              f"Python {platform.python_version()}, JAX {_version('jax')}, Flax "
              f"{_version('flax')}. Every number and figure above was computed in that run, "
              "except the table quoted from docs/benchmarks.md.*")
    try:
        shown_source = source.resolve().relative_to(ROOT).as_posix()
    except ValueError:
        shown_source = str(source)
    publishable(notebook)
    readme = render_markdown(notebook, name_figures(notebook, figures), footer, shown_source)
    notebook.cells.append(nbformat.v4.new_markdown_cell(footer, id="cell-footer"))
    nbformat.validate(notebook)  # raises before OUT is touched
    notebook_text = nbformat.writes(notebook) + "\n"

    out_figures = out_dir / "figures"
    out_figures.mkdir(parents=True, exist_ok=True)
    for stale in out_figures.glob("cell-*.png"):  # a figure the guide no longer makes must go
        if FIGURE_NAME.fullmatch(stale.name):
            stale.unlink()
    for png in figures.glob("*.png"):
        shutil.copyfile(png, out_figures / png.name)
    _write_atomic(out_dir / "README.md", readme)
    _write_atomic(out_dir / "guide.ipynb", notebook_text)
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
