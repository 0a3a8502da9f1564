"""Draw the known-manifold datasets and their Bayes-optimal gradients.

    python -m experiments.show_manifolds --out docs/

writes ``<out>/manifolds.png``: the default linear manifold (the project's sweep data), the
same geometry exactly on the subspace, and the curved bent-stroke manifold.
"""
from __future__ import annotations

import argparse
import os

import jax

from pagjax.manifolds import build_manifold
from pagjax.manifolds.figures import plot_manifold_overview


def main(argv=None) -> str:
    """Parse flags, build the three manifolds, write the figure; returns its path."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="docs/", help="output folder (default docs/)")
    parser.add_argument("--seed", type=int, default=0, help="PRNG seed (default 0)")
    parser.add_argument("--noise-levels", type=float, nargs="+", default=[0.0, 0.1, 0.5],
                        help="noise levels s at which to draw the Bayes gradients")
    args = parser.parse_args(argv)
    manifolds = {
        "linear_default": build_manifold("linear_default", key=args.seed),
        "linear_exact": build_manifold("linear_exact", key=args.seed),
        "curved": build_manifold("curved"),
    }
    path = plot_manifold_overview(manifolds, jax.random.PRNGKey(args.seed),
                                  os.path.join(args.out, "manifolds.png"),
                                  noise_levels=args.noise_levels)
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
