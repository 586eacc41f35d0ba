"""Similarity search: index build and query time of vidssl's faiss index vs brute-force numpy.

For each collection size N (random unit features, D=512 like R3D-18's pooled output) it times:

- build: ``SearchIndex.build`` (flat: normalise + add; IVF: also k-means training) against the
  numpy baseline's set-up (normalising the matrix);
- query: ``--queries`` single-video queries (top-``k``), the way ``vidssl search`` runs them,
  against numpy's ``q @ X.T`` + ``argpartition``; and one batched call of all queries;
- IVF recall@k against the exact result.

Usage: ``python benchmarks/search.py --sizes 10000 50000 100000``
"""

from __future__ import annotations

import argparse
import os
import platform
import time

import numpy as np

from vidssl.evaluation.search import SearchIndex, brute_force_search, l2_normalize


def _timeit(fn, repeat: int = 3) -> float:
    """Best wall time of ``repeat`` calls, in seconds (best-of filters load spikes)."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=100)
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=16)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    print(f"machine: {platform.machine()} {os.cpu_count()}-core CPU, {platform.system()}")
    print(f"load average before: {os.getloadavg()}")
    print(f"D={args.dim}, k={args.k}, {args.queries} queries, IVF nprobe={args.nprobe}")
    header = (
        f"{'N':>7} {'index':>5} {'build s':>8} {'numpy s':>8} | {'query ms':>8} "
        f"{'numpy ms':>8} {'speed-up':>8} | {'batch ms':>8} {'numpy ms':>8} {'speed-up':>8}"
        f" | {'recall':>6}"
    )
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        # Clustered features (not isotropic noise) so IVF meets the structure real embeddings have.
        centres = rng.normal(size=(max(10, n // 100), args.dim)).astype(np.float32)
        x = centres[rng.integers(0, len(centres), n)]
        x += 0.5 * rng.normal(size=x.shape).astype(np.float32)
        q = x[rng.choice(n, args.queries, replace=False)]
        q = q + 0.1 * rng.normal(size=q.shape).astype(np.float32)
        paths = [f"v{i}.mp4" for i in range(n)]

        numpy_build = _timeit(lambda x=x: l2_normalize(x), repeat=1)
        xn = l2_normalize(x)
        _, exact_ids = brute_force_search(xn, q, args.k)

        def numpy_single(xn=xn, q=q):
            for row in q:
                brute_force_search(xn, row, args.k, normalized=True)

        numpy_single_s = _timeit(numpy_single, repeat=1) / args.queries
        numpy_batch_s = _timeit(
            lambda xn=xn, q=q: brute_force_search(xn, q, args.k, normalized=True), repeat=2
        )

        for kind in ("flat", "ivf"):
            t0 = time.perf_counter()
            index = SearchIndex.build(x, paths, kind=kind, nprobe=args.nprobe)
            build_s = time.perf_counter() - t0

            def faiss_single(index=index, q=q):
                for row in q:
                    index.search_arrays(row, args.k)

            single_s = _timeit(faiss_single, repeat=2) / args.queries
            batch_s = _timeit(lambda index=index, q=q: index.search_arrays(q, args.k), repeat=2)
            _, ids = index.search_arrays(q, args.k)
            recall = np.mean([len(set(a) & set(b)) / args.k for a, b in zip(ids, exact_ids)])
            print(
                f"{n:>7} {kind:>5} {build_s:>8.3f} {numpy_build:>8.3f} | {single_s * 1e3:>8.2f} "
                f"{numpy_single_s * 1e3:>8.2f} {numpy_single_s / single_s:>7.1f}x | "
                f"{batch_s * 1e3:>8.1f} {numpy_batch_s * 1e3:>8.1f} "
                f"{numpy_batch_s / batch_s:>7.1f}x | {recall:>6.3f}"
            )
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
