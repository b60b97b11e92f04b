"""experiments.recipes: the comparison's arithmetic by hand, and the command end to end."""

import dataclasses
import json
import shlex

import pytest

from experiments import recipes
from unet_jax import configs


def _history(dices):
    return [{"epoch": e, "val_dice": d, "val_loss": 1 - d, "learning_rate": 1e-3}
            for e, d in enumerate(dices, 1)]


def test_gains_are_read_seed_by_seed_against_the_first_recipe():
    results = {"constant": [_history([0.5, 0.9]), _history([0.6, 0.7])],
               "cosine": [_history([0.8, 0.85]), _history([0.75, 0.8])]}
    constant, cosine = recipes.summarize(results)
    assert constant["best"] == [0.9, 0.7] and constant["gain"] == 0
    assert cosine["best"] == [0.85, 0.8] and cosine["last"] == [0.85, 0.8]
    assert cosine["gains"] == pytest.approx([-0.05, 0.1])
    assert cosine["gain"] == pytest.approx(0.025)
    assert constant["best_spread"] == pytest.approx(0.2)
    table = recipes.table([constant, cosine], [0, 1])
    assert "| cosine | 0.8500 / 0.8000 | 0.8250 | 0.0500 |" in table
    assert "-0.0500 / +0.1000 | +0.0250 |" in table


def test_a_recipe_changes_only_its_own_settings():
    base = configs.default()
    config = recipes.recipe_config(base, "cosine-2x+ema", seed=7)
    assert (config.schedule, config.warmup_epochs, config.ema, config.seed) == (
        "cosine", 1, recipes.EMA, 7)
    assert config.learning_rate == 2 * base.learning_rate
    assert recipes.recipe_config(base, "constant", 0) == dataclasses.replace(base, seed=0)


def test_the_command_trains_each_recipe_and_seed_and_writes_its_files(tmp_path, monkeypatch):
    """The command's plumbing, with the trainer (tested on its own) replaced by one that
    records what it was asked to train."""
    import unet_jax

    trained = []

    def train_and_evaluate(config, workdir, log=print):
        trained.append((config, workdir.name))
        history = _history([0.5, 0.6 + config.ema / 10])
        return {"history": history, "best": max(history, key=lambda r: r["val_dice"])}

    monkeypatch.setattr(unet_jax, "train_and_evaluate", train_and_evaluate)
    out = tmp_path / "lr0.003"  # a prefix with a dot keeps it
    argv = ["--preset", "tiny", "--epochs", "2", "--seeds", "2", "--recipes", "constant",
            "cosine+ema", "--out", str(out), "--platform", "cpu", "--group-by",
            "^(case\\d+)_"]
    code = recipes.main(argv)
    assert code == 0
    assert [name for _, name in trained] == ["constant-seed0", "cosine+ema-seed0",
                                             "constant-seed1", "cosine+ema-seed1"]
    assert [(c.seed, c.schedule, c.ema, c.epochs) for c, _ in trained][:2] == [
        (0, "constant", 0.0, 2), (0, "cosine", recipes.EMA, 2)]
    assert {c.group_by for c, _ in trained} == {"^(case\\d+)_"}
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "lr0.003.json", "lr0.003.md", "lr0.003.png"]
    saved = json.loads((tmp_path / "lr0.003.json").read_text())
    assert list(saved["histories"]) == ["constant", "cosine+ema"]
    assert saved["rows"][1]["gain"] == pytest.approx(recipes.EMA / 10)
    # The command that made it, every flag (the recipes, the grouping) included.
    assert shlex.split(saved["command"]) == ["python", "-m", "experiments.recipes", *argv]
    text = (tmp_path / "lr0.003.md").read_text()
    assert "| cosine+ema | 0.6990 / 0.6990 |" in text and f"`{saved['command']}`" in text
    assert "![lr0.003](lr0.003.png)" in text


def test_bad_outputs_and_repeats_are_refused_before_any_training(tmp_path, monkeypatch):
    """An unwritable --out failed with a traceback after every recipe had trained; a
    used --runs folder, or a recipe named twice, stopped it after the first recipe
    with train's advice (--workdir, --resume), flags recipes does not have."""
    import unet_jax

    from experiments.common import UserError
    from unet_jax.rundir import RunDirError

    monkeypatch.setattr(unet_jax, "train_and_evaluate", lambda *a, **k: pytest.fail("trained"))
    (tmp_path / "runs" / "constant-seed0").mkdir(parents=True)
    (tmp_path / "file").write_text("x")
    base = ["--preset", "tiny", "--seeds", "1", "--platform", "cpu"]
    for extra, message in [
            (["--out", str(tmp_path / "file" / "r")], "--out's folder"),
            (["--out", str(tmp_path)], "is a folder"),
            (["--out", str(tmp_path / "r"), "--recipes", "constant", "constant"],
             "names a recipe twice"),
            (["--out", str(tmp_path / "r"), "--runs", str(tmp_path / "runs")],
             "already holds constant-seed0/")]:
        with pytest.raises((UserError, RunDirError), match=message):  # each one line
            recipes.main(base + extra)
