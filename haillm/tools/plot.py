"""Training curves of one or more runs: `python -m haillm.tools.plot RUN_DIR [RUN_DIR ...] -o curves.png`.

Reads each run's `metrics.jsonl` and draws, against the step, the LM loss with the held-out one (`lm_loss`,
`eval_loss`: the same cross-entropy), the optimized objective (`loss`: LM + MTP + balance), the learning rate,
the gradient norm, tokens/s and the expert load imbalance (`max_vio`), every run overlaid in its own colour.
Skipped steps are drawn as crosses. Needs matplotlib (an optional dependency: `pip install matplotlib`).
Bad arguments, a run without metrics, or no matplotlib: one line on stderr, exit code 2.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from haillm.tools.schedule import OneLineParser

PANELS = (  # (title, metrics drawn, log scale)
    ("LM loss (solid) and held-out LM loss (dashed)", ("lm_loss", "eval_loss"), False),
    ("loss: LM + MTP + balance", ("loss",), False),
    ("learning rate", ("lr",), False),
    ("gradient norm (before clipping)", ("grad_norm",), True),
    ("tokens/s", ("tokens_per_s",), False),
    ("max_vio: expert load imbalance", ("max_vio",), False),
)


class PlotError(ValueError):
    """A run cannot be drawn (one-line message)."""


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise PlotError(f"{run_dir} has no metrics.jsonl: not a run directory, or the run wrote no step yet")
    lines, records = path.read_text().splitlines(), []
    for n, line in enumerate(lines, start=1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if n == len(lines):  # the last line of a running job, half written
                break
            raise PlotError(f"{path}:{n} is not JSON") from None
    return records


def plot(run_dirs: list[Path], out: Path) -> Path:
    """Draw the runs' curves into `out` (PNG); returns it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [(Path(d), read_metrics(d)) for d in run_dirs]
    fig = Figure(figsize=(15, 8.5), layout="constrained")
    axes = fig.subplots(2, 3).ravel()
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for ax, (title, keys, log) in zip(axes, PANELS, strict=True):
        for (run_dir, records), colour in zip(runs, colours, strict=True):
            for key, style in zip(keys, ("-", "--"), strict=False):
                points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
                if points:
                    steps, values = zip(*points, strict=True)
                    marker = "o" if key == "eval_loss" or len(points) == 1 else None
                    ax.plot(steps, values, style, color=colour, marker=marker, markersize=3,
                            label=run_dir.name if key == keys[0] else None)
            skipped = [(r["step"], r[keys[0]]) for r in records if r.get("skipped") and keys[0] in r]
            if skipped:
                ax.plot(*zip(*skipped, strict=True), "x", color=colour)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    out.parent.mkdir(parents=True, exist_ok=True)
    FigureCanvasAgg(fig).print_png(str(out))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = OneLineParser(prog="python -m haillm.tools.plot", description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run directories (each holding metrics.jsonl)")
    parser.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="the PNG to write")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        parser.error("needs matplotlib: pip install matplotlib")
    try:
        out = plot(args.runs, args.output)
    except (PlotError, OSError) as exc:
        parser.error(str(exc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
