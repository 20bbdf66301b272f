"""Embedding index candidates on synthetic clustered vectors: build time, bytes a vector,
queries/s and recall@10 against exact search, the one `mltag index` auto-selects, and a plain
numpy brute-force search for scale.

    python benchmarks/index_bench.py                   # 200k x 2048 (fits a 24 GiB machine with room)
    python benchmarks/index_bench.py --n 1000000 --dim 2048   # needs ~16 GiB for the raw vectors + exact index
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from results import save  # noqa: E402


def clustered_vectors(n: int, dim: int, clusters: int, seed: int) -> np.ndarray:
    """Unit vectors around random centres, like embeddings of a catalog's product kinds."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)).astype(np.float32)
    out = np.empty((n, dim), np.float32)
    for start in range(0, n, 50_000):
        m = min(50_000, n - start)
        out[start : start + m] = centres[rng.integers(0, clusters, m)] + 0.6 * rng.normal(size=(m, dim)).astype(np.float32)
    out /= np.linalg.norm(out, axis=1, keepdims=True)
    return out


def timed_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    started = time.time()
    _, found = index.search(queries, k)
    return found, len(queries) / (time.time() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--budget", default="2GiB", help="memory budget given to the auto-selection")
    parser.add_argument("--target-recall", type=float, default=0.95)
    args = parser.parse_args()

    import faiss

    from mltag.index import recall_at_k, tune_nprobe
    from mltag.index_selection import _nlist, choose_index, parse_bytes

    faiss.omp_set_num_threads(os.cpu_count())
    data = clustered_vectors(args.n, args.dim, args.clusters, 0)
    rng = np.random.default_rng(1)
    queries = data[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.normal(size=(args.queries, args.dim)).astype(np.float32)
    queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    k = 10

    started = time.time()
    scores = queries @ data.T  # plain numpy brute force: what a user would write first
    truth = np.argsort(-scores, axis=1)[:, :k]
    numpy_qps = args.queries / (time.time() - started)
    del scores

    auto = choose_index(args.n, args.dim, parse_bytes(args.budget))
    nlist = auto.nlist or _nlist(args.n)  # the IVF size auto-selection would use at this N
    # PQ with exact re-ranking of a short list (RFlat) is how compressed indexes reach high recall.
    candidates = ["Flat", f"IVF{nlist},Flat", f"IVF{nlist},PQ64", f"IVF{nlist},PQ64,RFlat", f"IVF{nlist}_HNSW32,PQ64"]
    if auto.factory not in candidates:
        candidates.append(auto.factory)
    rows, exact_qps = [], None
    train = data[rng.choice(args.n, min(args.n, 30 * nlist, 50_000), replace=False)]
    for factory in candidates:
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        started = time.time()
        if not index.is_trained:
            index.train(train)
        for start in range(0, args.n, 50_000):
            index.add(data[start : start + 50_000])
        build = time.time() - started
        size = faiss.serialize_index(index).nbytes
        nprobe = None
        if "IVF" in factory:
            tune_q = data[rng.choice(args.n, 200, replace=False)]
            tune_truth = np.argsort(-(tune_q @ data.T), axis=1)[:, :k]
            nprobe, _ = tune_nprobe(index, tune_q, tune_truth, nlist, args.target_recall, k)
        found, qps = timed_search(index, queries, k)
        recall = recall_at_k(found, truth)
        if factory == "Flat":
            exact_qps = qps
        rows.append({"factory": factory, "build_s": build, "bytes_per_vector": size / args.n, "nprobe": nprobe,
                     "qps": qps, "recall_at_10": recall, "auto": factory == auto.factory})
        print(f"{factory:<32} build {build:7.1f} s  {size / args.n:8.1f} B/vec  nprobe {nprobe}  {qps:9.1f} q/s  recall@10 {recall:.3f}", flush=True)
        del index

    lines = ["| index | build (s) | bytes / vector | nprobe | queries/s | speed vs exact | recall@10 |", "|---|---|---|---|---|---|---|",
             f"| numpy brute force (queries @ data.T) | - | {4 * args.dim} | - | {numpy_qps:.1f} | {numpy_qps / exact_qps:.2f}x | 1.000 |"]
    for r in rows:
        mark = " **(auto)**" if r["auto"] else ""
        lines.append(f"| {r['factory']}{mark} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['nprobe'] or '-'} | "
                     f"{r['qps']:.1f} | {r['qps'] / exact_qps:.1f}x | {r['recall_at_10']:.3f} |")
    table = "\n".join(lines)
    print(table)
    save("index_bench", {"args": vars(args), "auto": auto.factory, "auto_reason": auto.reason, "numpy_qps": numpy_qps, "rows": rows},
         f"{args.n:,} synthetic clustered unit vectors ({args.clusters} clusters), dimension {args.dim}; {args.queries} queries "
         f"(perturbed catalog vectors); recall@10 against exact search; nprobe tuned to recall {args.target_recall} on 200 other "
         f"queries. Auto-selection with a {args.budget} budget picks `{auto.factory}`: {auto.reason}. CPU only (no GPU was lent).\n\n{table}")


if __name__ == "__main__":
    main()
