"""Draws training curves (loss and accuracy, train vs validation, by epoch) from metrics.jsonl.

    python scripts/plot_metrics.py W            -> W/training_curves.png
    python scripts/plot_metrics.py W1 W2 [...]  -> the runs overlaid in training_curves_comparison.png
    (--out PATH to choose the file)
"""

from __future__ import annotations

import argparse
import os
import sys

from imgclf_jax import plotting
from imgclf_jax.metrics import read_metrics


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workdirs", nargs="+", help="work directories holding metrics.jsonl")
    parser.add_argument("--out", help="output PNG path")
    args = parser.parse_args(argv)
    runs = {}
    for workdir in args.workdirs:
        records = read_metrics(workdir)
        if not records:
            parser.exit(2, f"plot_metrics.py: error: no metrics.jsonl records in {workdir}\n")
        name = os.path.basename(os.path.normpath(workdir))
        while name in runs:
            name += "'"
        runs[name] = records
    out = args.out or (os.path.join(args.workdirs[0], "training_curves.png") if len(runs) == 1
                       else "training_curves_comparison.png")
    plotting.plot_training_curves(runs, out)
    print(f"Wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
