"""Pipeline schedule viewer: print a schedule's per-rank op order, optionally cost it and plot its timeline.

    python -m haillm.tools.schedule --schedule dualpipe --pp 4 --microbatches 8 \
        [--simulate] [--cost F=1,B=2,W=1,FB=2.5] [--plot timeline.png]

Output (DESIGN.md): one line per rank, ``rank<r>: <action> <action> ...``. ``--simulate`` appends
``sim ...`` lines: the costs used, per-rank busy/idle time and peak in-flight activations, the makespan and
the bubble (largest idle over ranks). Bad arguments, and ``--plot`` without matplotlib (an optional
dependency), print one line on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys

from haillm.parallel.pipeline.schedules import SCHEDULES, build, format_rank
from haillm.parallel.pipeline.simulate import Costs, plot_timeline, simulate


class OneLineParser(argparse.ArgumentParser):
    """argparse prints usage plus the error; the viewer's contract is a single line."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message}\n")


def _parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="python -m haillm.tools.schedule", description=__doc__.splitlines()[0])
    p.add_argument("--schedule", required=True, choices=sorted(SCHEDULES))
    p.add_argument("--pp", type=int, required=True, help="pipeline ranks (DualPipeV: 2*pp stages)")
    p.add_argument("--microbatches", type=int, required=True, help="micro-batches per step, all directions")
    p.add_argument("--simulate", action="store_true", help="append idle time, makespan and peak activations")
    p.add_argument("--cost", default="F=1,B=2,W=1,FB=2.5", help="costs of F, B, W, I (B-W), FB, P2P")
    p.add_argument("--plot", metavar="FILE.png", help="draw the simulated timeline")
    return p


def _num(x: float) -> str:
    return f"{x:.6f}".rstrip("0").rstrip(".")


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        costs = Costs.parse(args.cost)
        schedule, topo = build(args.schedule, args.pp, args.microbatches)
    except ValueError as e:
        parser.error(str(e))
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (an optional dependency: only the plot needs it)
        except ImportError:
            parser.error("--plot needs matplotlib, which is not installed: pip install matplotlib")
    lines = [format_rank(r, steps) for r, steps in enumerate(schedule)]
    if args.simulate or args.plot:
        sim = simulate(schedule, topo, costs)
        if args.simulate:
            i = costs.input_grad
            lines.append(f"sim costs: F={_num(costs.f)} B={_num(costs.b)} W={_num(costs.w)} I={_num(i)} "
                         f"FB={_num(costs.fb)} P2P={_num(costs.p2p)}")
            lines += [f"sim rank{r}: busy={_num(sim.busy[r])} idle={_num(sim.idle[r])} "
                      f"peak_activations={sim.peak_activations[r]}" for r in range(len(schedule))]
            lines.append(f"sim makespan={_num(sim.makespan)} bubble={_num(sim.bubble)}")
        if args.plot:
            plot_timeline(sim, args.plot, f"{args.schedule} pp={args.pp} microbatches={args.microbatches}: "
                                          f"makespan {_num(sim.makespan)}, bubble {_num(sim.bubble)}")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
