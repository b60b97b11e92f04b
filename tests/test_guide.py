"""The annotated guide (docs/guide/guide.py) runs from top to bottom, and its builder
writes a readable README, a valid notebook and every figure.

The whole guide runs at ``--size tiny`` (tiny images and models; about two minutes on a
2-core CPU, most of it compiling), so a change in the library that breaks a cell fails
here, not in front of a reader.
"""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest

from experiments import common, guide

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "docs" / "guide" / "guide.py"

# The figures each chapter of the guide promises its reader.
FIGURES = ["architecture", "receptive_field", "augmentation", "single_image_inference",
           "loss_and_dice", "predictions", "feature_maps", "skip_connections",
           "skips_vs_no_skips", "recipes", "losses_small_objects", "attention_gates"]


def test_read_source_reads_the_percent_format():
    text = ("# a header, not a cell\n"
            "\n"
            "# %% [markdown]\n"
            "# # Title\n"
            "#\n"
            "# Some *text*.\n"
            "\n"
            "# %%\n"
            "# a comment\n"
            "x = 1\n"
            "\n"
            "# %%\n"
            "\n"
            "print(x)\n")
    notebook = guide.read_source(text).notebook
    cells = notebook.cells
    assert [c.cell_type for c in cells] == ["markdown", "code", "code"]  # no header
    assert cells[0].source == "# Title\n\nSome *text*."
    assert cells[1].source == "# a comment\nx = 1"
    assert [c.id for c in cells] == ["cell-000", "cell-001", "cell-002"]
    assert guide.read_source(text).starts == {1: 9, 2: 14}  # each one's first line of text
    assert guide.first_line(cells[1].source) == "x = 1"
    assert not notebook.metadata and not any(c.metadata for c in cells)


def test_a_failing_cell_stops_the_build_with_one_line(tmp_path):
    source = tmp_path / "broken.py"
    source.write_text("# %%\nprint('fine')\n\n# %%\nvalues = [1, 2]\nvalues[5]\n")
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    last_build = f"the last good build\n\n{guide.BUILT_BY} --size tiny`*\n"
    (out / "README.md").write_text(last_build)
    (out / "figures" / "old.png").write_bytes(b"png")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.guide", "--source", str(source), "--out", str(out),
         "--platform", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == common.USER_ERROR
    # Besides one progress line per cell that ran, stderr is the error, in one line.
    err = [l for l in result.stderr.strip().splitlines() if not l.startswith("[")]
    assert len(err) == 1, result.stderr
    assert "cell 2 (line 5: 'values = [1, 2]')" in err[0]
    assert "IndexError" in err[0] and "line 6" in err[0]
    assert (out / "README.md").read_text() == last_build
    assert sorted(p.name for p in out.rglob("*")) == ["README.md", "figures", "old.png"]


def test_out_replaces_an_earlier_build_alone(tmp_path):
    """--out of a folder with a README of its own replaced it and deleted every PNG in
    figures/; --out naming a file failed with a traceback after the whole build."""
    from experiments.common import UserError

    guide.check_out(tmp_path / "new")  # a new folder: made
    guide.check_out(ROOT / "docs" / "guide")  # its own earlier build
    (tmp_path / "notes.txt").write_text("x")
    for out, message in [(tmp_path / "notes.txt", "is a file"),
                         (tmp_path, "holds a README.md the guide did not write")]:
        (tmp_path / "README.md").write_text("# my project\n")
        with pytest.raises(UserError, match=f"^--out {out} {message}"):
            guide.check_out(out)
    (tmp_path / "README.md").unlink()
    (tmp_path / "guide.ipynb").write_text("{}")
    with pytest.raises(UserError, match="holds a guide.ipynb the guide did not write"):
        guide.check_out(tmp_path)
    assert guide.FIGURE_NAME.fullmatch("cell-012-0.png")
    assert not guide.FIGURE_NAME.fullmatch("cell-plot.png")  # a user's: kept


def test_the_committed_guide_has_the_cells_of_its_source():
    """docs/guide/guide.ipynb is rebuilt whenever guide.py changes (the outputs may
    differ between machines; the cells may not)."""
    committed = json.loads((ROOT / "docs" / "guide" / "guide.ipynb").read_text())
    built = [("".join(c["source"]), c["cell_type"]) for c in committed["cells"]
             if c["id"] != "cell-footer"]
    cells = guide.read_source(SOURCE.read_text()).notebook.cells
    assert built == [(c.source, c.cell_type) for c in cells], (
        "docs/guide/guide.py changed: rebuild with `python -m experiments.guide`")


def test_the_committed_guide_quotes_the_code_as_it_is():
    """The guide's listings (``show(...)``: ``inspect.getsource`` at its build) are the
    library's code now: a listed function that changed (train_step, given an argument)
    leaves a learner copying a listing that fails, until the guide is rebuilt."""
    import inspect
    import textwrap

    import unet_jax
    from unet_jax import models

    committed = json.loads((ROOT / "docs" / "guide" / "guide.ipynb").read_text())
    listed = 0
    for cell in committed["cells"]:
        if cell["cell_type"] != "code":
            continue
        printed = "".join("".join(out.get("text", "")) for out in cell["outputs"])
        for call in re.findall(r"^show\((.+)\)$", "".join(cell["source"]), re.M):
            objects = [eval(name, {"models": models, "unet_jax": unet_jax})  # noqa: S307
                       for name in call.split(", ")]
            source = "\n\n".join(textwrap.dedent(inspect.getsource(o)).strip()
                                  for o in objects)
            assert source in printed, (f"show({call}): the code changed since the guide "
                                       "was built; rebuild with `python -m experiments.guide`")
            listed += 1
    assert listed >= 7


@pytest.fixture(scope="module")
def tiny_guide(tmp_path_factory):
    out = tmp_path_factory.mktemp("guide")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    result = subprocess.run(
        [sys.executable, "-m", "experiments.guide", "--size", "tiny", "--out", str(out),
         "--platform", "cpu"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=1800)
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_every_cell_of_the_tiny_guide_runs(tiny_guide):
    readme = (tiny_guide / "README.md").read_text()
    for chapter in ("## Model architecture", "## Model training", "## Model evaluation",
                    "## Experiments and results", "## Observed limitations of CPU training",
                    "## Limitations and weaknesses of U-Net", "## Future directions"):
        assert chapter in readme
    assert "31,031,745" in readme  # the guide's model, counted from its own parameters
    assert "Traceback" not in readme
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", readme)
    assert linked and all((tiny_guide / path).is_file() for path in linked)
    # Each figure once, under the name its cell saved it by: none shown a second time.
    assert sorted(linked) == sorted(f"figures/{name}.png" for name in FIGURES)


def test_the_tiny_guide_writes_a_valid_notebook(tiny_guide):
    notebook = json.loads((tiny_guide / "guide.ipynb").read_text())
    assert notebook["nbformat"] == 4 and notebook["nbformat_minor"] >= 4
    assert notebook["metadata"]["kernelspec"]["language"] == "python"
    cells = notebook["cells"]
    assert {c["cell_type"] for c in cells} == {"markdown", "code"}
    for cell in cells:
        assert {"cell_type", "id", "metadata", "source"} <= set(cell)
        if cell["cell_type"] == "code":
            assert {"execution_count", "outputs"} <= set(cell)
    images = [o for c in cells if c["cell_type"] == "code" for o in c["outputs"]
              if "image/png" in o.get("data", {})]
    assert len(images) == len(FIGURES)
    assert not any(o.get("name") == "stderr" for c in cells for o in c.get("outputs", []))
    nbformat.validate(nbformat.reads(json.dumps(notebook), as_version=4))


def test_the_tiny_guide_makes_every_figure(tiny_guide):
    missing = [name for name in FIGURES if not (tiny_guide / "figures" / f"{name}.png").is_file()]
    assert not missing
