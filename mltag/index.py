"""The embedding index: FAISS over L2-normalised tag-table embeddings, searched by inner product
(= cosine similarity), with the listing-id mapping beside it.

An index directory holds versions and a pointer to the current one:
  ``CURRENT``            the name of the current version (replaced atomically: a reader, or a
                         crash at any moment, sees the previous complete version or the new one)
  ``v000007/index.faiss`` the FAISS index; it maps vectors to 64-bit ids (IVF indexes themselves,
                         others through an IDMap2), so listings can be removed and re-added by id
  ``v000007/ids.parquet`` faiss_id -> listing_id, image_uri, tags
  ``v000007/index.json``  model version, the tag table and table version it reflects, dimension,
                         metric, factory string, count
A new version is written whole into ``.staging-*`` and renamed into place before ``CURRENT``
moves; the previous version is kept for readers that opened it.

Example:
    >>> build_index(IndexConfig(tag_table="demo_out/tag_table", out="demo_out/index"))  # doctest: +SKIP
    >>> update_index(IndexUpdateConfig(index="demo_out/index"))  # to the table's new version  # doctest: +SKIP
    >>> EmbeddingIndex.load("demo_out/index").search_listing("L000123", k=5)            # doctest: +SKIP
"""

from __future__ import annotations

import json
import os
import shutil
import time
import uuid
from bisect import bisect_left
from collections.abc import Iterator
from dataclasses import dataclass

import faiss
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from mltag import delta_table, tag_table
from mltag.config import config_hash
from mltag.index_selection import IndexChoice, choose_index, parse_bytes

INDEX_FILE, IDS_FILE, META_FILE, POINTER_FILE = "index.faiss", "ids.parquet", "index.json", "CURRENT"
VERSIONS_KEPT = 2  # the current version and the one before it (a reader may still have it open)
TRAIN_SAMPLE = 100_000  # vectors a trainable index learns its quantisers from, at least (a uniform sample of the table)
TRAIN_PER_CENTROID = 39  # training vectors faiss wants a k-means centroid to have
TRAIN_MIN = 10_000  # the sample never shrinks below this for the budget: PQ's 256-centroid sub-quantisers want 39 x 256
TRAIN_BUDGET_SHARE = 4  # the training sample may use 1/4 of --max-index-memory (or TRAIN_MIN vectors, if more)
REFINE_K_FACTOR = 16  # candidates a refine stage (RFlat) re-ranks exactly, times k
OPQ_ITERATIONS = 10  # rotation updates when training OPQ (faiss defaults to 50)
PLATEAU_GAIN = 0.005  # recall@k a doubling of nprobe must add to be worth its cost


@dataclass
class IndexConfig:
    """Build a FAISS similarity index from a committed tag table."""

    tag_table: str = ""  # the Delta tag table
    as_of: str = ""  # table version number or date (2026-11-20) to index; empty: the latest
    out: str = "runs/index"  # index directory (local)
    factory: str = "auto"  # auto (chosen from N and the memory budget) or a FAISS factory string, e.g. IVF4096,PQ64
    max_index_memory: str = "4GiB"  # memory budget for the index (auto selection)
    target_recall: float = 0.95  # nprobe is raised until recall@10 on held-out queries reaches this
    tune_queries: int = 500  # queries sampled for nprobe tuning
    batch_rows: int = 65_536  # rows streamed from Parquet per add() call
    seed: int = 0  # training sample and tuning queries

    def validate(self) -> None:
        if not self.tag_table:
            raise ValueError("tag_table is required (--tag-table DIR)")
        if not 0 < self.target_recall <= 1:
            raise ValueError("target_recall must be in (0, 1]")


@dataclass
class SearchConfig:
    """Find the listings most similar to a listing id or an image."""

    index: str = "runs/index"  # index directory built by `mltag index`
    listing_id: str = ""  # query by a listing already in the index
    image: str = ""  # or query by an image file or URI (runs the tagger)
    ids_file: str = ""  # or a text file of listing ids, one a line: results go to --out
    out: str = ""  # Parquet file for --ids-file results (query_listing_id, rank, listing_id, similarity, tags)
    model: str = ""  # tagger directory for image queries; empty: the one that made the tag table
    k: int = 5  # neighbours to return

    def validate(self) -> None:
        if sum(map(bool, (self.listing_id, self.image, self.ids_file))) != 1:
            raise ValueError("give exactly one of --listing-id, --image or --ids-file")
        if self.ids_file and not self.out:
            raise ValueError("--ids-file needs --out (a Parquet file for the results)")
        if self.k < 1:
            raise ValueError("k must be positive")


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, 1e-12)


def _ok_batches(dataset, batch_rows: int, filter=None):
    """(table of listing_id/image_uri/tags, normalised vectors) per batch, error rows skipped."""
    for batch in dataset.scanner(
        columns=["listing_id", "image_uri", "tags", "embedding", "error"], batch_size=batch_rows, filter=filter
    ).to_batches():
        table = pa.Table.from_batches([batch])
        ok = table.filter(pc.is_null(table.column("error")))
        yield (
            table.num_rows - ok.num_rows,
            ok.select(["listing_id", "image_uri", "tags"]),
            l2_normalise(tag_table.embedding_matrix(ok.column("embedding"))) if ok.num_rows else None,
        )


def exact_neighbours(queries: np.ndarray, batches, k: int) -> np.ndarray:
    """Brute-force top-k ids by inner product, streaming over (ids, vectors) batches: the
    ground truth for recall, in memory O(queries x k)."""
    best_scores = np.full((len(queries), k), -np.inf, np.float32)
    best_ids = np.full((len(queries), k), -1, np.int64)
    for ids, vectors in batches:
        scores = queries @ vectors.T
        all_scores = np.concatenate([best_scores, scores], axis=1)
        all_ids = np.concatenate([best_ids, np.broadcast_to(ids, scores.shape)], axis=1)
        top = np.argpartition(-all_scores, k - 1, axis=1)[:, :k]
        best_scores = np.take_along_axis(all_scores, top, axis=1)
        best_ids = np.take_along_axis(all_ids, top, axis=1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_ids, order, axis=1)


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Share of the true top-k ids that the index returned (order ignored)."""
    hits = sum(len(set(f[f >= 0]) & set(t[t >= 0])) for f, t in zip(found, truth))
    return hits / max(1, int((truth >= 0).sum()))


def tune_nprobe(index: faiss.Index, queries: np.ndarray, truth: np.ndarray, nlist: int, target: float, k: int = 10) -> tuple[int, float]:
    """The smallest power-of-two nprobe whose recall@k reaches ``target``; where the index
    cannot reach it (compressed codes cap recall), the nprobe after which doubling stops helping,
    so a search never scans every list for recall it will not get."""
    params = faiss.ParameterSpace()
    nprobe, best_nprobe, best_recall = 1, 1, -1.0
    while True:
        params.set_index_parameter(index, "nprobe", nprobe)
        _, found = index.search(queries, k)
        recall = recall_at_k(found, truth)
        if recall >= target:
            return nprobe, recall
        if recall < best_recall + PLATEAU_GAIN:
            params.set_index_parameter(index, "nprobe", best_nprobe)
            return best_nprobe, best_recall
        best_nprobe, best_recall = nprobe, recall
        if nprobe >= nlist:
            return nprobe, recall
        nprobe = min(nlist, nprobe * 2)


def train_sample_size(n: int, dim: int, nlist: int, max_memory_bytes: int) -> int:
    """Vectors a trainable index learns from: 39 a centroid and at least ``TRAIN_SAMPLE``, at most
    a quarter of the memory budget (but never under ``TRAIN_MIN`` for it) and at most the table (pure)."""
    wanted = max(TRAIN_PER_CENTROID * nlist, TRAIN_SAMPLE)
    affordable = max(max_memory_bytes // TRAIN_BUDGET_SHARE // (4 * max(dim, 1)), TRAIN_MIN)
    return int(max(0, min(n, wanted, affordable)))


SAMPLE_CHUNK = 1 << 20  # positions given random keys at a time by uniform_sample_positions


def uniform_sample_positions(n: int, m: int, seed) -> np.ndarray:
    """``m`` distinct positions out of ``range(n)``, sorted, every m-subset equally likely and the
    same for the same ``seed`` (pure). Each position gets a random key, chunk by chunk, and the m
    smallest keys so far are kept (argpartition): memory O(m + chunk), never O(n), and the result
    does not depend on how a table is cut into batches."""
    n, m = int(n), max(0, min(int(m), int(n)))
    if m == 0:
        return np.zeros(0, np.int64)
    if m == n:
        return np.arange(n, dtype=np.int64)
    rng = np.random.default_rng(seed)
    chunk = max(m, SAMPLE_CHUNK)
    keys, positions = np.zeros(0), np.zeros(0, np.int64)
    for start in range(0, n, chunk):
        stop = min(n, start + chunk)
        keys = np.concatenate([keys, rng.random(stop - start)])
        positions = np.concatenate([positions, np.arange(start, stop, dtype=np.int64)])
        if len(keys) > m:
            keep = np.argpartition(keys, m - 1)[:m]
            keys, positions = keys[keep], positions[keep]
    return np.sort(positions)


def _rows_in_batch(positions: np.ndarray, start: int, length: int) -> np.ndarray:
    """The rows of a batch holding table positions [start, start + length) that ``positions`` (sorted) names."""
    lo, hi = np.searchsorted(positions, [start, start + length])
    return positions[lo:hi] - start


def build_index(config: IndexConfig) -> dict:
    """Streams the committed tag table's embeddings (error rows skipped) into a FAISS index
    chosen for its size, tunes nprobe, and saves index + id map + metadata. A trainable index
    (IVF, PQ) is trained on a uniform sample of the whole table, read by a first streamed pass;
    the pass that adds the vectors follows (a Flat index takes that one pass only)."""
    source = tag_table.open_dataset(config.tag_table, config.as_of or None)
    table_meta = tag_table.run_metadata(config.tag_table, config.as_of or None)
    dim = int(table_meta["embedding_dim"])
    n_expected = source.count_rows(filter=pc.field("error").is_null())
    budget = parse_bytes(config.max_index_memory)
    if config.factory == "auto":
        choice = choose_index(n_expected, dim, budget)
    else:
        choice = IndexChoice(config.factory, "given by --factory", 0.0, _factory_nlist(config.factory), "IVF" in config.factory)
    index = _new_index(dim, choice.factory)
    started = time.time()

    train_sample = None
    if not index.is_trained:
        # First streamed pass: a uniform sample of every embedding row, not the first rows in file
        # order (those follow however the table was written: one category, one night, one shard).
        positions = uniform_sample_positions(n_expected, train_sample_size(n_expected, dim, choice.nlist, budget), (config.seed, 0))
        sample, taken = np.empty((len(positions), dim), np.float32), 0
        for ids, vectors in _numbered_batches(source, config.batch_rows):
            rows = _rows_in_batch(positions, int(ids[0]), len(ids))
            sample[taken : taken + len(rows)] = vectors[rows]
            taken += len(rows)
        if taken:
            train_index(index, sample[:taken])
        train_sample = taken
        del sample

    # Tuning queries: a uniform sample too, read while adding.
    query_positions = uniform_sample_positions(n_expected, config.tune_queries, (config.seed, 1)) if choice.nlist else np.zeros(0, np.int64)
    queries, n_queries = np.empty((len(query_positions), dim), np.float32), 0
    next_id, skipped = 0, 0
    id_tables: list[pa.Table] = []
    for skipped_here, ok, vectors in _ok_batches(source, config.batch_rows):
        skipped += skipped_here
        if vectors is None:
            continue
        ids = np.arange(next_id, next_id + ok.num_rows, dtype=np.int64)
        rows = _rows_in_batch(query_positions, next_id, len(ids))
        queries[n_queries : n_queries + len(rows)] = vectors[rows]
        n_queries += len(rows)
        next_id += ok.num_rows
        id_tables.append(ok.append_column("faiss_id", pa.array(ids, pa.int64())))
        index.add_with_ids(vectors, ids)
    _enable_reconstruct(index)
    if next_id == 0:
        raise ValueError(f"{config.tag_table} has no embeddings to index (every row is an error row)")

    nprobe, recall = None, None
    if choice.nlist and n_queries:
        queries = queries[:n_queries]
        k = min(10, next_id)
        truth = exact_neighbours(queries, _numbered_batches(source, config.batch_rows), k)  # a further streamed pass
        nprobe, recall = tune_nprobe(index, queries, truth, choice.nlist, config.target_recall, k)

    id_map = pa.concat_tables(id_tables)
    meta = {
        "model_version": table_meta["model_version"],
        "model": table_meta.get("model"),
        "tag_table": table_meta["table"],
        "table_version": table_meta["table_version"],
        "tag_table_run_id": table_meta.get("run_id"),
        "config_hash": config_hash(config),
        "dim": dim,
        "metric": "inner_product_on_l2_normalised",
        "factory": _factory_label(index, choice.factory),
        "reason": choice.reason,
        "nprobe": nprobe,
        "tuned_recall_at_10": recall,
        "train_sample": train_sample,
        "count": int(index.ntotal),
        "next_id": int(next_id),
        "skipped_error_rows": skipped,
        "build_seconds": round(time.time() - started, 3),
    }
    version_dir = write_version(config.out, index, id_map.select(["faiss_id", "listing_id", "image_uri", "tags"]), meta)
    print(
        f"index: {meta['count']} vectors ({skipped} error rows skipped), {meta['factory']}, dim {dim}, table version {meta['table_version']} -> {version_dir}\n"
        f"       why: {choice.reason}"
        + (f"; trained on a uniform sample of {train_sample} vectors" if train_sample else "")
        + (f"; nprobe {nprobe} gives recall@10 {recall:.3f}" if nprobe else "")
    )
    return meta


def _numbered_batches(source, batch_rows: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(FAISS ids, vectors) of the embedding rows in read order, numbered as the build numbers them."""
    next_id = 0
    for _, _, vectors in _ok_batches(source, batch_rows):
        if vectors is None:
            continue
        yield np.arange(next_id, next_id + len(vectors), dtype=np.int64), vectors
        next_id += len(vectors)


def _ivf_of(index: faiss.Index):
    try:
        return faiss.extract_index_ivf(index)
    except RuntimeError:
        return None


def _new_index(dim: int, factory: str) -> faiss.Index:
    """IVF indexes (alone or behind a transform such as OPQ) store our 64-bit ids themselves and
    remove them correctly; anything else (Flat, HNSW, a refine stage) is wrapped in an IDMap2."""
    inner = faiss.index_factory(dim, factory, faiss.METRIC_INNER_PRODUCT)
    top = faiss.downcast_index(inner)
    if isinstance(top, faiss.IndexPreTransform):
        top = faiss.downcast_index(top.index)
    if isinstance(top, faiss.IndexRefine):
        # Re-rank k_factor x k candidates exactly; faiss's default 1 re-ranks nothing. Saved with the index.
        top.k_factor = REFINE_K_FACTOR
    return inner if isinstance(top, faiss.IndexIVF) else faiss.IndexIDMap2(inner)


def _enable_reconstruct(index: faiss.Index) -> None:
    """IVF indexes need a direct map to give vectors back (search by listing id); a hash-table
    one also survives removals (incremental updates)."""
    ivf = _ivf_of(index)
    if ivf is not None:
        ivf.set_direct_map_type(faiss.DirectMap.Hashtable)


def _factory_label(index: faiss.Index, factory: str) -> str:
    return f"IDMap2,{factory}" if isinstance(index, faiss.IndexIDMap2) else factory


def _factory_nlist(factory: str) -> int:
    import re

    match = re.search(r"IVF(\d+)", factory)
    return int(match.group(1)) if match else 0


def _train_ivf_on_gpus(ivf: faiss.Index, sample: np.ndarray) -> bool:
    """k-means of an IVF-Flat coarse quantiser on every GPU faiss sees (the faiss-gpu extra).
    False where there is none, or GPU faiss refuses: the caller trains on CPU."""
    if faiss.get_num_gpus() == 0 or not hasattr(faiss, "index_cpu_to_all_gpus"):
        return False
    try:
        clustering = faiss.Clustering(ivf.d, ivf.nlist)
        clustering.train(sample, faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(ivf.d)))
        ivf.quantizer.add(faiss.vector_to_array(clustering.centroids).reshape(ivf.nlist, ivf.d))
        ivf.is_trained = True
        return True
    except (RuntimeError, AttributeError) as exc:
        print(f"GPU training not used ({exc}); training on CPU")
        return False


def train_index(index: faiss.Index, sample: np.ndarray) -> None:
    """Trains a fresh index's quantisers on ``sample``: IVF-Flat centroids by GPU k-means when
    faiss-gpu is there, everything else on CPU, with OPQ's rotation search bounded."""
    if isinstance(index, faiss.IndexIVFFlat) and _train_ivf_on_gpus(index, sample):
        return
    if isinstance(index, faiss.IndexPreTransform):
        for i in range(index.chain.size()):
            transform = faiss.downcast_VectorTransform(index.chain.at(i))
            if isinstance(transform, faiss.OPQMatrix):
                # Each OPQ iteration retrains the whole PQ; faiss's default 50 of them take hours
                # at 256 sub-quantisers on a few cores, for little recall over the first ten.
                transform.niter = min(transform.niter, OPQ_ITERATIONS)
    index.train(sample)


# ---- index versions: written whole, switched by one atomic rename -----------------------------------
def current_version_dir(directory: str) -> str:
    """The directory of the index's current version (what ``CURRENT`` names)."""
    pointer = os.path.join(directory, POINTER_FILE)
    if not os.path.exists(pointer):
        raise FileNotFoundError(f"no index at {directory} (missing {POINTER_FILE}); build one with `mltag index`")
    with open(pointer) as f:
        return os.path.join(directory, f.read().strip())


def _versions(directory: str) -> list[str]:
    return sorted(n for n in os.listdir(directory) if n.startswith("v") and n[1:].isdigit()) if os.path.isdir(directory) else []


def write_version(directory: str, index: faiss.Index, ids: pa.Table, meta: dict, fail_after: str = "") -> str:
    """Writes a complete new version (index, id map, metadata) into a staging directory, renames it
    into place, then points ``CURRENT`` at it (temporary file + rename). A crash at any step leaves
    ``CURRENT`` on the previous complete version. ``fail_after`` names a step to crash after
    (fault tests only). Returns the new version's directory."""
    os.makedirs(directory, exist_ok=True)
    for name in os.listdir(directory):  # a crashed writer's leftovers
        if name.startswith(".staging-"):
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    staging = os.path.join(directory, f".staging-{uuid.uuid4().hex[:8]}")
    os.makedirs(staging)
    steps = [
        (INDEX_FILE, lambda p: faiss.write_index(index, p)),
        (IDS_FILE, lambda p: pq.write_table(ids, p)),
        (META_FILE, lambda p: open(p, "w").write(json.dumps(meta, indent=2))),
    ]
    for name, write in steps:
        write(os.path.join(staging, name))
        if fail_after == name:
            raise RuntimeError(f"injected failure after writing {name}")
    versions = _versions(directory)
    name = f"v{(int(versions[-1][1:]) + 1 if versions else 1):06d}"
    final = os.path.join(directory, name)
    os.rename(staging, final)
    if fail_after == "rename":
        raise RuntimeError("injected failure after renaming the new version into place")
    tmp = os.path.join(directory, f".{POINTER_FILE}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w") as f:
        f.write(name)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, os.path.join(directory, POINTER_FILE))
    for old in _versions(directory)[:-VERSIONS_KEPT]:
        shutil.rmtree(os.path.join(directory, old), ignore_errors=True)
    return final


class EmbeddingIndex:
    """A loaded index with listing-id lookups. ``search_*`` return a pyarrow table of neighbours.

    The id map stays Arrow and numpy, a few bytes a row whatever the catalog's size: ``ids`` sorted
    by faiss id (a FAISS id maps to its row by binary search), and the rows' order by listing id
    (a listing maps to its rows by binary search, a batch of listings by one vectorised scan)."""

    def __init__(self, index: faiss.Index, ids: pa.Table, meta: dict):
        ids = ids.combine_chunks()
        faiss_ids = ids.column("faiss_id").to_numpy()
        if len(faiss_ids) > 1 and not (np.diff(faiss_ids) > 0).all():
            ids = ids.take(pa.array(np.argsort(faiss_ids, kind="stable"))).combine_chunks()
            faiss_ids = ids.column("faiss_id").to_numpy()
        self.index, self.ids, self.meta = index, ids, meta
        self._faiss_ids = faiss_ids.astype(np.int64, copy=False)  # sorted; a view of the Arrow column where it can be
        column = ids.column("listing_id")
        listings = self._listings = column.chunk(0) if column.num_chunks == 1 else column.combine_chunks()
        # Rows by listing id (a stable sort: a listing's rows stay in faiss-id order); nulls sort last, never looked up.
        order = pc.sort_indices(listings).to_numpy()
        self._by_listing = order.astype(np.int32 if len(order) < 2**31 else np.int64)
        self._n_listed = len(listings) - listings.null_count

    @classmethod
    def load(cls, directory: str, mmap: bool = False) -> EmbeddingIndex:
        """The current version of the index at ``directory`` (a version directory also works)."""
        if not os.path.exists(os.path.join(directory, META_FILE)):
            directory = current_version_dir(directory)
        flags = faiss.IO_FLAG_MMAP if mmap else 0
        index = faiss.read_index(os.path.join(directory, INDEX_FILE), flags)
        with open(os.path.join(directory, META_FILE)) as f:
            meta = json.load(f)
        loaded = cls(index, pq.read_table(os.path.join(directory, IDS_FILE)), meta)
        if meta.get("nprobe"):
            loaded.set_search_parameter("nprobe", meta["nprobe"])
        return loaded

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def set_search_parameter(self, name: str, value: float) -> None:
        """Sets a FAISS search-time knob (e.g. ``nprobe``) through any IDMap wrapper."""
        faiss.ParameterSpace().set_index_parameter(self.index, name, value)

    def rows_of_faiss_ids(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Rows of ``ids`` holding these FAISS ids (any shape); -1 for an id not in the map (faiss's
        missing-neighbour placeholder -1 included)."""
        faiss_ids = np.asarray(faiss_ids, np.int64)
        rows = np.searchsorted(self._faiss_ids, faiss_ids)
        rows = np.minimum(rows, max(len(self._faiss_ids) - 1, 0))
        found = (self._faiss_ids[rows] == faiss_ids) if len(self._faiss_ids) else np.zeros(faiss_ids.shape, bool)
        return np.where(found, rows, -1)

    def _row_of_listing(self, listing_id: str) -> int:
        """The listing's first row (its first image), by binary search; -1 where it is not in the index."""
        listings, order = self._listings, self._by_listing
        at = bisect_left(range(self._n_listed), listing_id, key=lambda i: listings[int(order[i])].as_py())
        if at < self._n_listed and listings[int(order[at])].as_py() == listing_id:
            return int(order[at])
        return -1

    def _rows_of_listings(self, listing_ids: list[str]) -> np.ndarray:
        """Each listing's first row, -1 for one not in the index: one vectorised scan of the listing
        column against the (small) set of queries, not a lookup table of every listing."""
        queries = pa.array(listing_ids, pa.string())
        if len(queries) == 0 or not len(self._listings):
            return np.full(len(queries), -1, np.int64)
        hit_rows = np.flatnonzero(pc.is_in(self._listings, value_set=queries).to_numpy(zero_copy_only=False))
        # index_in gives the first occurrence: the smallest row, the listing's first image.
        at = pc.index_in(queries, value_set=self._listings.take(pa.array(hit_rows, pa.int64())))
        at = pc.fill_null(at, -1).to_numpy()
        return np.where(at >= 0, hit_rows[np.maximum(at, 0)] if len(hit_rows) else -1, -1).astype(np.int64)

    def vectors_of_faiss_ids(self, faiss_ids: np.ndarray) -> np.ndarray:
        """Normalised vectors read back from the index for these FAISS ids, in one batch call where
        the index type has one."""
        faiss_ids = np.ascontiguousarray(faiss_ids, np.int64)
        if not len(faiss_ids):
            return np.zeros((0, self.index.d), np.float32)
        try:
            return self.index.reconstruct_batch(faiss_ids)
        except (RuntimeError, AttributeError):
            return np.stack([self.index.reconstruct(int(i)) for i in faiss_ids])

    def image_uri_of(self, listing_id: str) -> str | None:
        """The URI of the listing's (first) image; None for a listing not in the index."""
        row = self._row_of_listing(listing_id)
        return None if row < 0 else self.ids.column("image_uri")[row].as_py()

    def tags_of(self, listing_id: str) -> list[str] | None:
        """The listing's (first image's) tags as the index recorded them; None when not in the index."""
        row = self._row_of_listing(listing_id)
        return None if row < 0 else (self.ids.column("tags")[row].as_py() or [])

    def vector_of(self, listing_id: str) -> np.ndarray:
        """The listing's (first image's) normalised embedding, read back from the index."""
        row = self._row_of_listing(listing_id)
        if row < 0:
            raise KeyError(f"listing {listing_id!r} is not in the index")
        return self.index.reconstruct(int(self._faiss_ids[row])).reshape(1, -1)

    def _search_flat(self, queries: np.ndarray, k: int) -> tuple[pa.Table, np.ndarray]:
        """All queries' neighbours as one table (listing_id, image_uri, tags, similarity, rank), query
        by query, and how many rows each query has: faiss's placeholders (id -1) dropped, the rows
        taken from ``ids`` in one call."""
        scores, faiss_ids = self.index.search(l2_normalise(queries), k)
        rows = self.rows_of_faiss_ids(faiss_ids)
        keep = rows >= 0
        table = self.ids.take(pa.array(rows[keep], pa.int64())).drop_columns(["faiss_id"])
        table = table.append_column("similarity", pa.array(scores[keep], pa.float32()))
        rank = np.cumsum(keep, axis=1, dtype=np.int32)[keep]
        return table.append_column("rank", pa.array(rank, pa.int32())), keep.sum(axis=1)

    def search_vectors(self, queries: np.ndarray, k: int) -> list[pa.Table]:
        table, counts = self._search_flat(queries, k)
        offsets = np.concatenate([[0], np.cumsum(counts)])
        return [table.slice(int(offsets[i]), int(counts[i])) for i in range(len(counts))]

    def search_listing(self, listing_id: str, k: int = 5) -> pa.Table:
        """Top-k listings most similar to a listing in the index (itself first, similarity 1)."""
        return self.search_vectors(self.vector_of(listing_id), k)[0]

    def search_listings(self, listing_ids: list[str], k: int = 5) -> pa.Table:
        """Top-k for many listings in one batched search; ids not in the index are skipped.
        Returns query_listing_id, rank, listing_id, similarity, image_uri, tags."""
        rows = self._rows_of_listings(listing_ids)
        present = np.flatnonzero(rows >= 0)
        if not len(present):
            return pa.table({"query_listing_id": pa.array([], pa.string())})
        vectors = self.vectors_of_faiss_ids(self._faiss_ids[rows[present]])
        table, counts = self._search_flat(vectors, k)
        query = pa.array(listing_ids, pa.string()).take(pa.array(np.repeat(present, counts), pa.int64()))
        table = table.append_column("query_listing_id", query)
        return table.select(["query_listing_id", "rank", "listing_id", "similarity", "image_uri", "tags"])

    def search_image(self, uri: str, model_dir: str, k: int = 5) -> pa.Table:
        """Top-k listings most similar to an image file or URI, embedded by the tagger."""
        from mltag.embed import embed_images

        vectors, errors = embed_images([uri], model_dir)
        if errors[0] is not None:
            raise ValueError(f"cannot embed query image: {errors[0]}")
        return self.search_vectors(vectors, k)[0]


def format_neighbours(table: pa.Table) -> str:
    lines = [f"{'rank':>4}  {'similarity':>10}  {'listing_id':<16}  tags"]
    for row in table.to_pylist():
        lines.append(f"{row['rank']:>4}  {row['similarity']:>10.4f}  {row['listing_id']:<16}  {', '.join(row['tags'] or [])}")
    return "\n".join(lines)


def run_search(config: SearchConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    if config.ids_file:
        with open(config.ids_file) as f:
            queries = [line.strip() for line in f if line.strip()]
        result = index.search_listings(queries, config.k)
        pq.write_table(result, config.out)
        found = len(set(result.column("query_listing_id").to_pylist()))
        print(f"{found} of {len(queries)} listings found in the index; {result.num_rows} neighbours -> {config.out}")
        return result
    if config.listing_id:
        result = index.search_listing(config.listing_id, config.k)
        print(f"listings most similar to {config.listing_id}:")
    else:
        model = config.model or index.meta.get("model")
        if not model:
            raise ValueError("give --model: the index does not record which tagger made it")
        result = index.search_image(config.image, model, config.k)
        print(f"listings most similar to image {config.image}:")
    print(format_neighbours(result))
    return result


@dataclass
class IndexUpdateConfig:
    """Bring an index to a newer version of its tag table, or remove listings, without a rebuild."""

    index: str = "runs/index"  # index directory to update
    tag_table: str = ""  # the tag table it follows; empty: the one the index records
    as_of: str = ""  # table version number or date to bring the index to; empty: the latest
    remove_ids_file: str = ""  # text file of listing ids to remove, one a line
    batch_rows: int = 65_536  # rows streamed per add() call


CHANGE_RANK = {"delete": 0, "update_preimage": 0, "insert": 1, "update_postimage": 1}


def net_changes(changes: pa.Table) -> tuple[pa.Table, pa.Table]:
    """From change-feed rows (listing_id, image_uri, _change_type, _commit_version) over several
    versions, the net effect per key: (keys whose last change wrote a row, keys whose last change
    deleted it). Within one version a written row wins over a removed one (an overwrite removes the
    old file and adds the new one)."""
    keys = ["listing_id", "image_uri"]
    changes = pa.table(
        {k: changes.column(k).cast(pa.string()) for k in keys + ["_change_type"]}
        | {"_commit_version": changes.column("_commit_version").cast(pa.int64())}
    )
    rank = pa.array([CHANGE_RANK[c] for c in changes.column("_change_type").to_pylist()], pa.int64())
    order = pc.add(pc.multiply(changes.column("_commit_version").cast(pa.int64()), 2), rank)
    keyed = changes.select(keys).append_column("_order", order).append_column("_rank", rank)
    last = keyed.group_by(keys, use_threads=False).aggregate([("_order", "max")]).rename_columns(keys + ["_order"])
    final = last.join(keyed, keys=keys + ["_order"], right_keys=keys + ["_order"], join_type="inner", use_threads=False)
    written = final.filter(pc.equal(final.column("_rank"), 1)).select(keys)
    removed = final.filter(pc.equal(final.column("_rank"), 0)).select(keys)
    return written, removed


def _faiss_ids_of_keys(ids: pa.Table, keys: pa.Table) -> np.ndarray:
    if keys.num_rows == 0:
        return np.zeros(0, np.int64)
    hit = ids.select(["faiss_id", "listing_id", "image_uri"]).join(
        keys, keys=["listing_id", "image_uri"], join_type="inner", use_threads=False
    )
    return np.sort(hit.column("faiss_id").to_numpy()).astype(np.int64)


def update_index(config: IndexUpdateConfig, remove: list[str] | None = None, fail_after: str = "") -> dict:
    """Applies exactly the rows that changed between the table version the index reflects and the
    target version (read from the table's change feed): new and updated rows are (re-)added, rows
    deleted or turned into error rows are removed. Listings named in ``remove`` go too. Writes a
    new index version; refuses a table tagged by another model than the index's."""
    index = EmbeddingIndex.load(config.index)
    meta = dict(index.meta)
    uri = config.tag_table or meta.get("tag_table")
    if not uri:
        raise ValueError("give --tag-table: the index does not record which table it was built from")
    dt = delta_table.open_table(uri, config.as_of or None)
    target = dt.version()
    table_meta = delta_table.commit_metadata(dt)
    if table_meta.get("model_version") != meta["model_version"]:
        raise ValueError(
            f"{uri} version {target} was tagged by model {table_meta.get('model_version')}, the index holds embeddings "
            f"of model {meta['model_version']}: rebuild it with `mltag index`"
        )
    start = int(meta.get("table_version", -1)) + 1
    written = removed = pa.table({"listing_id": pa.array([], pa.string()), "image_uri": pa.array([], pa.string())})
    if start <= target:
        changes = pa.table(
            dt.load_cdf(
                starting_version=start, ending_version=target, columns=["listing_id", "image_uri", "_change_type", "_commit_version"]
            ).read_all()
        )
        written, removed = net_changes(changes)
    remove = list(remove or [])
    if config.remove_ids_file:
        with open(config.remove_ids_file) as f:
            remove += [line.strip() for line in f if line.strip()]
    doomed = np.union1d(
        _faiss_ids_of_keys(index.ids, pa.concat_tables([written, removed])),
        index.ids.filter(pc.is_in(index.ids.column("listing_id"), pa.array(remove, pa.string())))
        .column("faiss_id")
        .to_numpy()
        .astype(np.int64)
        if remove
        else np.zeros(0, np.int64),
    )
    if len(doomed):
        # An explicit array selector: the only kind an IVF hash-table direct map accepts.
        try:
            index.index.remove_ids(faiss.IDSelectorArray(len(doomed), faiss.swig_ptr(doomed)))
        except RuntimeError as exc:  # faiss has no removal for some types (a refine stage)
            raise ValueError(
                f"{meta['factory']} cannot remove or replace vectors ({len(doomed)} needed): "
                f"rebuild it with `mltag index`, or choose a factory without a refine stage"
            ) from exc
    ids = index.ids.filter(pc.invert(pc.is_in(index.ids.column("faiss_id"), pa.array(doomed, pa.int64()))))
    next_id = int(meta.get("next_id", int(index.ids.column("faiss_id").to_numpy().max(initial=-1)) + 1))
    new_tables = []
    if written.num_rows:
        # The written rows' embeddings, streamed from the target version (error rows skipped: they leave the index).
        wanted = pc.is_in(
            pc.binary_join_element_wise(pc.field("listing_id"), pc.field("image_uri"), "\x1f"),
            value_set=pc.binary_join_element_wise(written.column("listing_id"), written.column("image_uri"), "\x1f"),
        )
        for _, ok, vectors in _ok_batches(dt.to_pyarrow_dataset(), config.batch_rows, filter=wanted):
            if vectors is None:
                continue
            faiss_ids = np.arange(next_id, next_id + ok.num_rows, dtype=np.int64)
            next_id += ok.num_rows
            index.index.add_with_ids(vectors, faiss_ids)
            new_tables.append(ok.append_column("faiss_id", pa.array(faiss_ids, pa.int64())).select(ids.column_names))
    ids = pa.concat_tables([ids, *new_tables])
    added = sum(t.num_rows for t in new_tables)
    meta.update(
        {
            "count": int(index.index.ntotal),
            "next_id": next_id,
            "table_version": target,
            "tag_table": delta_table.table_uri(uri),
            "last_update": {
                "added": added,
                "removed": int(len(doomed)),
                "from_table_version": start - 1,
                "to_table_version": target,
                "at": time.strftime("%Y-%m-%dT%H:%M:%S"),
            },
        }
    )
    version_dir = write_version(config.index, index.index, ids, meta, fail_after=fail_after)
    print(f"index updated to table version {target}: +{added} vectors, -{len(doomed)} vectors, now {meta['count']} -> {version_dir}")
    return meta
