"""Embedding index candidates on synthetic clustered vectors: build time, bytes a vector,
queries/s and recall@10 against exact search, the one `mltag index` auto-selects, and a plain
numpy brute-force search for scale.

    python benchmarks/index_bench.py                   # 200k x 2048 (fits a 24 GiB machine with room)
    python benchmarks/index_bench.py --n 1000000 --dim 2048   # needs ~18 GiB: raw vectors + the exact index
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

REFINE_K_FACTOR = 16  # RFlat re-ranks 16 x k PQ candidates with the raw vectors
GOAL_RECALL, GOAL_SPEEDUP = 0.95, 20.0  # the bar for an approximate index


class ClusteredEmbeddings:
    """Unit vectors shaped like a catalog's image embeddings: product kinds (clusters) in a
    low-dimensional latent space (CNN embeddings have far fewer degrees of freedom than
    dimensions), mapped into ``dim`` dimensions, plus a little isotropic noise."""

    def __init__(self, dim: int, clusters: int, intrinsic: int = 48, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.basis = (rng.normal(size=(intrinsic, dim)) / np.sqrt(intrinsic)).astype(np.float32)
        self.centres = (2.0 * rng.normal(size=(clusters, intrinsic))).astype(np.float32)
        self.dim = dim

    def chunks(self, n: int, seed: int, chunk: int = 50_000):
        """The same ``n`` vectors every time for a seed, ``chunk`` rows at a time: an index build
        streams them instead of holding the whole matrix beside the index (1M x 2048 is 8 GiB)."""
        rng = np.random.default_rng(seed)
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            latent = self.centres[rng.integers(0, len(self.centres), m)] + rng.standard_normal((m, self.basis.shape[0]), np.float32)
            block = latent @ self.basis + 0.1 * rng.standard_normal((m, self.dim), np.float32)
            yield block / np.linalg.norm(block, axis=1, keepdims=True)

    def sample(self, n: int, seed: int) -> np.ndarray:
        out = np.empty((n, self.dim), np.float32)
        start = 0
        for block in self.chunks(n, seed):
            out[start : start + len(block)] = block
            start += len(block)
        return out


def serialized_bytes(index) -> int:
    """The index's size on disk, counted as faiss writes it (no copy of an 8 GiB index in memory)."""
    import faiss

    total = 0

    def count(chunk: bytes) -> None:
        nonlocal total
        total += len(chunk)

    faiss.write_index(index, faiss.PyCallbackIOWriter(count))
    return total


def numpy_top_k(queries: np.ndarray, data: np.ndarray, k: int, chunk: int = 100) -> np.ndarray:
    """Plain numpy brute force, what a user writes first: scores, then the k best of each row."""
    out = np.empty((len(queries), k), np.int64)
    for start in range(0, len(queries), chunk):
        scores = queries[start : start + chunk] @ data.T
        top = np.argpartition(-scores, k, axis=1)[:, :k]
        order = np.argsort(-np.take_along_axis(scores, top, axis=1), axis=1)
        out[start : start + chunk] = np.take_along_axis(top, order, axis=1)
    return out


def torch_top_k(queries: np.ndarray, data: np.ndarray, k: int, chunk: int = 100) -> np.ndarray:
    """The torch version: one matmul and topk a chunk of queries."""
    import torch

    table = torch.from_numpy(data)
    found = [torch.topk(torch.from_numpy(queries[s : s + chunk]) @ table.T, k, dim=1).indices for s in range(0, len(queries), chunk)]
    return torch.cat(found).numpy()


def timed(fn, *args) -> tuple[object, float]:
    started = time.time()
    result = fn(*args)
    return result, time.time() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--clusters", type=int, default=1000)
    parser.add_argument("--queries", type=int, default=500)
    parser.add_argument("--budgets", nargs="+", default=["2GiB", "12GiB"], help="memory budgets given to the auto-selection")
    parser.add_argument("--target-recall", type=float, default=0.95)
    parser.add_argument("--candidates", nargs="*", help="factory strings to compare (default: a fixed list + the auto choice)")
    args = parser.parse_args()

    import faiss

    from mltag.search import TRAIN_SAMPLE, recall_at_k, train_index, tune_nprobe
    from mltag.search.index_selection import _nlist, choose_index, parse_bytes

    faiss.omp_set_num_threads(os.cpu_count())
    k = 10
    model = ClusteredEmbeddings(args.dim, args.clusters)
    data = model.sample(args.n, seed=1)
    queries = model.sample(args.queries, seed=2)  # new listings from the same catalog
    tune_queries = model.sample(200, seed=3)  # nprobe is tuned on other queries than the measured ones
    print(f"{args.n:,} x {args.dim} vectors ({data.nbytes / 2**30:.1f} GiB) made", flush=True)

    # The plain alternatives hold the whole matrix in memory; the indexes below are fed from the
    # generator instead, so the matrix and an index never need memory together.
    truth, numpy_s = timed(numpy_top_k, queries, data, k)
    _, torch_s = timed(torch_top_k, queries, data, k)
    tune_truth = numpy_top_k(tune_queries, data, k)
    rng = np.random.default_rng(4)
    train = data[np.sort(rng.choice(args.n, min(args.n, TRAIN_SAMPLE), replace=False))]  # as much as `mltag index` uses
    del data
    print(f"numpy brute force {args.queries / numpy_s:.1f} q/s, torch {args.queries / torch_s:.1f} q/s", flush=True)

    autos = {budget: choose_index(args.n, args.dim, parse_bytes(budget)) for budget in args.budgets}
    nlist = _nlist(args.n)  # the IVF size auto-selection uses at this N
    # PQ with exact re-ranking of a short list (RFlat) is how compressed indexes reach high recall.
    candidates = args.candidates or ["Flat", f"IVF{nlist},Flat", f"IVF{nlist}_HNSW32,PQ64", f"IVF{nlist},PQ64,RFlat"]
    candidates += [a.factory for a in autos.values() if a.factory not in candidates]
    rows, exact_qps = [], None
    for factory in candidates:
        index = faiss.index_factory(args.dim, factory, faiss.METRIC_INNER_PRODUCT)
        started = time.time()
        if not index.is_trained:
            train_index(index, train)
        build = time.time() - started
        for block in model.chunks(args.n, seed=1):  # generating is not timed, adding is
            started = time.time()
            index.add(block)
            build += time.time() - started
        size = serialized_bytes(index)
        nprobe = None
        if "RFlat" in factory:
            faiss.ParameterSpace().set_index_parameter(index, "k_factor_rf", REFINE_K_FACTOR)
        if "IVF" in factory:
            nprobe, _ = tune_nprobe(index, tune_queries, tune_truth, nlist, args.target_recall, k)
        (_, found), search_s = timed(index.search, queries, k)
        qps = args.queries / search_s
        recall = recall_at_k(found, truth)
        if factory == "Flat":
            exact_qps = qps
        picked_by = [budget for budget, a in autos.items() if a.factory == factory]
        rows.append(
            {
                "factory": factory,
                "build_s": build,
                "bytes_per_vector": size / args.n,
                "nprobe": nprobe,
                "qps": qps,
                "recall_at_10": recall,
                "auto_for_budgets": picked_by,
            }
        )
        print(
            f"{factory:<36} build {build:7.1f} s  {size / args.n:8.1f} B/vec  nprobe {nprobe}  {qps:9.1f} q/s  recall@10 {recall:.3f}",
            flush=True,
        )
        del index
        write_results(
            args,
            autos,
            rows,
            exact_qps or args.queries / numpy_s,
            args.queries / numpy_s,
            args.queries / torch_s,
            done=factory == candidates[-1],
        )  # after every row: a long run killed part way keeps what it measured


def write_results(args, autos, rows, exact_qps, numpy_qps, torch_qps, done) -> None:
    lines = [
        "| index | build (s) | bytes / vector | nprobe | queries/s | speed vs exact (Flat) | recall@10 |",
        "|---|---|---|---|---|---|---|",
        f"| numpy brute force (argpartition of queries @ data.T) | - | {4 * args.dim} | - | {numpy_qps:.1f} | {numpy_qps / exact_qps:.2f}x | 1.000 |",
        f"| torch brute force (topk of queries @ data.T) | - | {4 * args.dim} | - | {torch_qps:.1f} | {torch_qps / exact_qps:.2f}x | 1.000 |",
    ]
    for r in rows:
        mark = f" **(auto, {' / '.join(r['auto_for_budgets'])} budget)**" if r["auto_for_budgets"] else ""
        lines.append(
            f"| {r['factory']}{mark} | {r['build_s']:.1f} | {r['bytes_per_vector']:.0f} | {r['nprobe'] or '-'} | "
            f"{r['qps']:.1f} | {r['qps'] / exact_qps:.1f}x | {r['recall_at_10']:.3f} |"
        )
    table = "\n".join(lines)
    if done:
        print(table)
    meets = [r["factory"] for r in rows if r["recall_at_10"] >= GOAL_RECALL and r["qps"] / exact_qps >= GOAL_SPEEDUP]
    verdict = (
        f"Goal (recall@10 >= {GOAL_RECALL} at >= {GOAL_SPEEDUP:.0f}x exact search's speed) met by: "
        + (", ".join(f"`{f}`" for f in meets) if meets else "none of them")
        + ". "
        "An index with PQ codes only (no raw vectors to re-rank with) stops where its codes cap recall; "
        "nprobe tuning then stops too, rather than scan every list for nothing."
    )
    reasons = " ".join(f"With a {budget} budget auto-selection picks `{a.factory}`: {a.reason}." for budget, a in autos.items())
    save(
        "index_bench",
        {
            "args": vars(args),
            "complete": done,
            "auto": {b: a.factory for b, a in autos.items()},
            "auto_reason": {b: a.reason for b, a in autos.items()},
            "numpy_qps": numpy_qps,
            "torch_qps": torch_qps,
            "rows": rows,
        },
        f"{args.n:,} synthetic clustered unit vectors, dimension {args.dim}: {args.clusters} product kinds in a 48-d latent "
        f"space mapped to {args.dim}-d plus noise (see `ClusteredEmbeddings`). {args.queries} queries are new vectors from "
        f"the same distribution; recall@10 against exact search; nprobe tuned to recall {args.target_recall} (or to where "
        f"doubling it stops helping) on 200 other queries; RFlat re-ranks {REFINE_K_FACTOR}x k candidates exactly. "
        f"Built on 2 cores, so build times are long; they scale with cores. {reasons} CPU only (no GPU was lent)."
        + ("" if done else " **Incomplete run: the rows measured before it stopped.**")
        + f"\n\n{table}\n\n{verdict}",
    )


if __name__ == "__main__":
    main()
