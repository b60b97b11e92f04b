"""Compare training recipes (learning-rate schedule, weight averaging) over several seeds.

A schedule or an EMA is worth its setting only if it beats the guide's constant rate
by more than what changing the seed alone does. This command trains a preset once per
recipe and seed (the same seed gives every recipe the same split, initial weights and
batch order, so the recipes are compared pair by pair), and writes:

    OUT.md    the table: best and last validation Dice per recipe, mean and spread
              over the seeds, and the mean gain over the constant rate
    OUT.json  every run's per-epoch history
    OUT.png   learning rate, validation loss and Dice per epoch, one colour per
              recipe, one line per seed

The recipes (``RECIPES``) are the constant rate, one epoch of warm-up then cosine at
the same and at twice the peak rate, each with and without an EMA of the weights.
"""

from __future__ import annotations

import dataclasses
import json
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path

from experiments import common

EXAMPLES = """
python -m experiments.recipes --platform cpu --seeds 3 --out docs/results/recipes-sample
python -m experiments.recipes --platform cpu --recipes constant cosine+ema --seeds 2 --out /tmp/r
"""

EMA = 0.99  # a run of a few hundred steps: the ramp (1+n)/(10+n) caps it below that anyway
RECIPES = {
    "constant": {},
    "constant+ema": {"ema": EMA},
    "cosine": {"schedule": "cosine", "warmup_epochs": 1},
    "cosine+ema": {"schedule": "cosine", "warmup_epochs": 1, "ema": EMA},
    "cosine-2x": {"schedule": "cosine", "warmup_epochs": 1, "lr_factor": 2},
    "cosine-2x+ema": {"schedule": "cosine", "warmup_epochs": 1, "lr_factor": 2, "ema": EMA},
}


def recipe_config(base, name: str, seed: int):
    """``base`` with recipe ``name``'s settings and ``seed``."""
    settings = dict(RECIPES[name])
    factor = settings.pop("lr_factor", 1)
    return dataclasses.replace(base, seed=seed, learning_rate=base.learning_rate * factor,
                               **settings)


def compare(base, names, seeds, runs_dir, log=print) -> dict:
    """{recipe: [history per seed]}: ``base`` trained once per recipe and seed, each
    run in ``runs_dir/<recipe>-seed<seed>``."""
    import unet_jax

    results = {name: [] for name in names}
    for seed in seeds:
        for name in names:
            start = time.perf_counter()
            summary = unet_jax.train_and_evaluate(recipe_config(base, name, seed),
                                                  Path(runs_dir) / f"{name}-seed{seed}",
                                                  log=lambda *a: None)
            results[name].append(summary["history"])
            log(f"{name:>14}, seed {seed}: best Dice {summary['best']['val_dice']:.4f}, "
                f"last {summary['history'][-1]['val_dice']:.4f} "
                f"({time.perf_counter() - start:.0f} s)")
    return results


def summarize(results: dict) -> list[dict]:
    """One row per recipe: best and last validation Dice per seed, their mean and
    spread (max - min), and the mean gain over the first recipe, seed by seed."""
    rows, reference = [], None
    for name, histories in results.items():
        best = [max(r["val_dice"] for r in h) for h in histories]
        last = [h[-1]["val_dice"] for h in histories]
        reference = reference or best
        gains = [b - r for b, r in zip(best, reference)]
        rows.append({"recipe": name, "best": best, "last": last,
                     "best_mean": statistics.mean(best), "best_spread": max(best) - min(best),
                     "last_mean": statistics.mean(last), "last_spread": max(last) - min(last),
                     "gain": statistics.mean(gains), "gains": gains})
    return rows


def table(rows: list[dict], seeds) -> str:
    """The markdown table of ``summarize``'s rows."""
    lines = [f"| recipe | best val Dice per seed ({', '.join(map(str, seeds))}) | mean | "
             "spread | last-epoch mean | gain over constant, per seed | mean gain |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {' / '.join(f'{v:.4f}' for v in r['best'])} | "
                     f"{r['best_mean']:.4f} | {r['best_spread']:.4f} | {r['last_mean']:.4f} | "
                     f"{' / '.join(f'{g:+.4f}' for g in r['gains'])} | {r['gain']:+.4f} |")
    return "\n".join(lines)


def figure(results: dict):
    """Learning rate, validation loss and validation Dice per epoch: one colour per
    recipe, one line per seed. Returns the matplotlib figure."""
    from unet_jax.report import _pyplot

    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for i, (name, histories) in enumerate(results.items()):
        for j, history in enumerate(histories):
            epochs = [r["epoch"] for r in history]
            style = dict(color=f"C{i}", label=name if j == 0 else None, alpha=0.8,
                         marker="o", markersize=3)
            for ax, key in zip(axes, ("learning_rate", "val_loss", "val_dice")):
                ax.plot(epochs, [r[key] for r in history], **style)
    axes[0].set(xlabel="epoch", ylabel="learning rate at the epoch's last step")
    axes[1].set(xlabel="epoch", ylabel="validation loss (BCE)", yscale="log")
    last = [h[-1]["val_dice"] for hs in results.values() for h in hs]
    bottom = max(0.0, min(last) - 0.05)
    # Zoomed to where the recipes differ; the first epochs' lower scores fall below.
    hidden = any(r["val_dice"] < bottom for hs in results.values() for h in hs for r in h)
    axes[2].set(xlabel="epoch", ylabel="validation Dice" + (
        f" (epochs under {bottom:.2f} not shown)" if hidden else ""), ylim=(bottom, 1.0))
    axes[2].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    return fig


def plot(results: dict, path: Path) -> None:
    """``figure(results)`` written to ``path``."""
    from unet_jax.report import _save

    _save(figure(results), path)


def parse_args(argv=None):
    from unet_jax import configs

    p = common.make_parser("experiments.recipes", __doc__.split("\n\n")[0], EXAMPLES)
    common.add_platform_flag(p)
    p.add_argument("--preset", default="default", choices=list(configs.PRESETS),
                   help="the settings every recipe starts from [default]")
    p.add_argument("--recipes", nargs="+", default=list(RECIPES), choices=list(RECIPES),
                   metavar="NAME", help=f"recipes to compare, the first as the reference "
                   f"({', '.join(RECIPES)}) [all]")
    p.add_argument("--seeds", type=common.positive_int, default=3,
                   help="seeds per recipe: 0, 1, ... [3]")
    p.add_argument("--epochs", type=common.positive_int, help="override the preset's epochs")
    p.add_argument("--data-dir", help="train on this dataset instead of the preset's "
                   "(the built-in sample set by default)")
    p.add_argument("--group-by", metavar="REGEX", help="read each image's group from its "
                   "file name, as train's --group-by, so that a group stays on one side "
                   "of every recipe's split")
    p.add_argument("--out", required=True, help="prefix of OUT.md, OUT.json and OUT.png")
    p.add_argument("--runs", help="keep the run directories here (default: a temporary "
                   "folder, removed at the end)")
    return p.parse_args(argv)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    from unet_jax import configs

    overrides = {k: v for k, v in (("epochs", args.epochs), ("data_dir", args.data_dir),
                                   ("group_by", args.group_by)) if v}
    base = configs.get(args.preset, **overrides)
    if len(set(args.recipes)) < len(args.recipes):
        raise common.UserError("--recipes names a recipe twice: give each once")
    out = Path(args.out)
    # Checked before hours of training, which an unwritable --out would otherwise lose.
    from unet_jax import rundir

    if out.is_dir():
        raise common.UserError(f"--out {out} is a folder; give a prefix such as {out / 'recipes'}")
    rundir.check_writable(out.parent, "--out's folder")
    if args.runs:
        taken = [run for run in (f"{name}-seed{seed}" for name in args.recipes
                                 for seed in range(args.seeds))
                 if (Path(args.runs) / run).exists()]
        if taken:
            raise common.UserError(f"--runs {args.runs} already holds {taken[0]}/: give a new "
                                   "folder (each recipe trains from scratch)")
    backend = common.start_platform(args.platform, args)
    seeds = list(range(args.seeds))
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="recipes-") as scratch:
        results = compare(base, args.recipes, seeds, args.runs or scratch)
    rows = summarize(results)
    from experiments.benchmark import machine_info

    info = machine_info()
    command = shlex.join(["python", "-m", "experiments.recipes", *argv])  # to run it again
    machine = f"{info['cpu']} ({info['cores']} cores), JAX on {backend}"
    text = (f"# Training recipes on {'the sample set' if base.data_dir is None else base.data_dir}"
            f"\n\n`{command}`: {base.epochs} epochs, "
            f"batch {base.batch_size}, lr {base.learning_rate:g}, width "
            f"{base.base_features}, {base.image_size[0]}x{base.image_size[1]}; EMA decay "
            f"{EMA}; {machine}; {time.perf_counter() - start:.0f} s in all.\n\n"
            + table(rows, seeds) + f"\n\n![{out.name}]({out.name}.png)\n")
    # Appended, not with_suffix: a prefix such as lr0.003 keeps its last part.
    Path(f"{out}.md").write_text(text)
    Path(f"{out}.json").write_text(json.dumps(
        {"command": command, "preset": args.preset, "epochs": base.epochs, "seeds": seeds,
         "machine": machine, "rows": rows, "histories": results}, indent=1))
    plot(results, Path(f"{out}.png"))
    print(text)
    return 0


if __name__ == "__main__":
    common.run(main, prog="python -m experiments.recipes")
