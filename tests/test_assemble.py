"""The tag table's rows built from whole arrays (``tag_table.assemble``) against a plain per-row
reference on random batches with error rows, hierarchy and a tag cap."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from mltag.data.vocabulary import Vocabulary
from mltag.table import tag_table


def _reference(n, ok, scores, embeddings, names, thresholds, ancestors, max_tags, errors):
    rows = []
    for i in range(n):
        if i in ok:
            k = list(ok).index(i)
            s = scores[k]
            chosen = {j for j in range(len(names)) if s[j] >= thresholds[j]}
            if max_tags:
                best = sorted(range(len(names)), key=lambda j: (-s[j], j))[:max_tags]
                chosen &= set(best)
            for j in list(chosen):
                for parent in ancestors.get(names[j], []):
                    chosen.add(names.index(parent))
            rows.append(
                {
                    "tags": [names[j] for j in sorted(chosen)],
                    "scores": [float(np.float32(v)) for v in s],
                    "embedding": [float(np.float32(v)) for v in embeddings[k]],
                    "error": None,
                }
            )
        else:
            rows.append({"tags": [], "scores": None, "embedding": None, "error": errors[i]})
    return rows


@pytest.mark.parametrize("seed,max_tags", [(0, 0), (1, 2), (2, 0), (3, 1)])
def test_assemble_matches_a_per_row_reference(seed, max_tags):
    rng = np.random.default_rng(seed)
    n, names = 40, ["top", "dress", "shoes", "red", "sneakers", "footwear"]
    ancestors = {"sneakers": ["shoes", "footwear"], "shoes": ["footwear"], "dress": ["top"]}  # the reference's own closure
    vocab = Vocabulary(tuple(names), {"sneakers": "shoes", "shoes": "footwear", "dress": "top"})
    ok = np.sort(rng.choice(n, size=int(rng.integers(0, n + 1)), replace=False)).astype(np.int64)
    scores = rng.random((len(ok), len(names))).astype(np.float32)
    embeddings = rng.normal(size=(len(ok), 6)).astype(np.float32)
    thresholds = rng.uniform(0.2, 0.8, len(names)).astype(np.float32)
    errors = [None if i in set(ok) else f"corrupt: row {i}" for i in range(n)]
    uris = [f"s3://b/{i}.jpg?X-Amz-Signature=secret" if i % 7 == 0 else f"/data/{i}.jpg" for i in range(n)]
    batch = pa.table(
        {"listing_id": [f"L{i}" for i in range(n)], "image_uri": uris, "error": errors, "tags": [["top"]] * n, "price": list(range(n))}
    )

    chosen = tag_table.chosen_tags(scores, thresholds, vocab, max_tags)
    table = tag_table.assemble(batch, ok, scores, embeddings, chosen, "v1", errors, names=names)
    from_lists = tag_table.assemble(batch, ok, scores, embeddings, [[names[j] for j in np.flatnonzero(r)] for r in chosen], "v1", errors)

    expected = _reference(n, ok, scores, embeddings, names, thresholds, ancestors, max_tags, errors)
    got = table.select(["tags", "scores", "embedding", "error"]).to_pylist()
    assert got == expected
    assert table.equals(from_lists)
    assert table.column("true_tags").to_pylist() == [["top"]] * n and table.column("price").to_pylist() == list(range(n))
    assert table.column("model_version").to_pylist() == ["v1"] * n
    stored = table.column("image_uri").to_pylist()
    assert all("secret" not in u for u in stored) and stored[1] == "/data/1.jpg"
    assert table.column("scores").null_count == n - len(ok) == table.column("embedding").null_count
