"""The inference actor on its own (in process): batches padded to one shape for a compiled model
give the rows an unpadded call gives."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from mltag.data.catalog import read_manifest
from mltag.data.images import decode_batch
from mltag.tagger.model import load_spec
from mltag.tagging.actor import TaggerActor


def test_padded_batches_tag_exactly_like_unpadded_ones(tiny_catalog, tiny_model_dir, tmp_path):
    manifest = read_manifest(tiny_catalog["manifest"]).select(["listing_id", "image_uri"]).slice(0, 5)
    missing = pa.table({"listing_id": ["GONE"], "image_uri": [str(tmp_path / "gone.jpg")]})
    batch = decode_batch(pa.concat_tables([manifest, missing]), load_spec(tiny_model_dir).img_size)

    plain = TaggerActor(tiny_model_dir, use_gpu=False, threads=1, threshold=0.5)
    padded = TaggerActor(tiny_model_dir, use_gpu=False, threads=1, threshold=0.5, pad_to=16)
    shapes = []
    forward = padded.forward
    padded.forward = lambda x: shapes.append(tuple(x.shape)) or forward(x)
    a, b = plain(batch), padded(batch)

    assert [s[0] for s in shapes] == [16]  # 5 decoded images went in as one 16-row batch
    assert a.num_rows == b.num_rows == 6 and b.column("error").null_count == 5
    for name in ("listing_id", "tags", "error"):
        assert a.column(name).to_pylist() == b.column(name).to_pylist()
    for name in ("scores", "embedding"):
        ok = pc.is_valid(a.column(name))
        np.testing.assert_allclose(
            np.stack(a.column(name).filter(ok).to_numpy(zero_copy_only=False)),
            np.stack(b.column(name).filter(ok).to_numpy(zero_copy_only=False)),
            atol=1e-5,
        )
