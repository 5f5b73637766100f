#!/usr/bin/env python
"""Time one DOTResize point solve (support, cost, Sinkhorn, QR) at a given width, beside the PCA
eigen-solve of the same point, from float64 moments only.

  python tools/bench_ot.py --width 4096 --keep 0.75 --repeats 3 [--device cuda]
"""

import argparse
import json
import statistics
import time

import torch

from streamresize.methods import dotresize, pca
from streamresize.statistics import PointStatistics


def synthetic_stats(width, device, seed=0):
    """Moments of correlated signals with a decaying spectrum, like a residual stream's."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    mixing = torch.randn(width, width, generator=g, dtype=torch.float64) / width ** 0.5
    mixing *= torch.logspace(0, -2, width, dtype=torch.float64)[:, None]
    stats = PointStatistics(width, device)
    stats.gram = (mixing.T @ mixing).to(device) * 1e4
    stats.sum = torch.randn(width, generator=g, dtype=torch.float64).to(device)
    stats.abs_sum = stats.gram.diagonal().sqrt() * 0.8
    stats.count = 10_000
    return stats


def timed(fn, repeats, device):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times, result


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=4096)
    p.add_argument("--keep", type=float, default=0.75)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--epsilon", type=float, default=dotresize.DEFAULTS["epsilon"])
    args = p.parse_args()
    device = torch.device(args.device)
    stats = synthetic_stats(args.width, device)
    k = int(args.width * args.keep) // 8 * 8
    pca_s, pca_all, _ = timed(lambda: pca.solve(stats, k, {}), args.repeats, device)
    ot_s, ot_all, (_, info) = timed(lambda: dotresize.solve(stats, k, {"epsilon": args.epsilon}), args.repeats,
                                    device)
    print(json.dumps({"width": args.width, "kept": k, "device": str(device), "threads": torch.get_num_threads(),
                      "dotresize_s": ot_s, "dotresize_runs": ot_all, "pca_s": pca_s, "pca_runs": pca_all,
                      "ratio_to_pca": ot_s / pca_s, "iterations": info.get("iterations"),
                      "solver": info.get("solver"), "marginal_error": info.get("marginal_error")}))


if __name__ == "__main__":
    main()
