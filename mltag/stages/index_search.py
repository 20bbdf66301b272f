"""``mltag search``: the listings most similar to a listing id, a list of them, or an image.

A listing already in the index is searched by its stored vector; an image is embedded by the
tagger first (``mltag.tagger.embed``, imported only for an image query: it brings torch and timm). The
neighbours table is the command's answer and goes to stdout; a list of ids writes Parquet.

Example:
    mltag search --index runs/index --listing-id L000042
    mltag search --index runs/index --image some/photo.jpg --k 10
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from mltag.config import provenance_beside, save_provenance
from mltag.search.embedding_index import EmbeddingIndex

logger = logging.getLogger(__name__)


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


def search_image(index: EmbeddingIndex, uri: str, model_dir: str, k: int = 5) -> pa.Table:
    """Top-k listings most similar to an image file or URI, embedded by the tagger in ``model_dir``."""
    from mltag.tagger.embed import embed_images

    vectors, errors = embed_images([uri], model_dir)
    if errors[0] is not None:
        raise ValueError(f"cannot embed query image: {errors[0]}")
    return index.search_vectors(vectors, k)[0]


def format_neighbours(table: pa.Table) -> str:
    lines = [f"{'rank':>4}  {'similarity':>10}  {'listing_id':<16}  tags"]
    for row in table.to_pylist():
        lines.append(f"{row['rank']:>4}  {row['similarity']:>10.4f}  {row['listing_id']:<16}  {', '.join(row['tags'] or [])}")
    return "\n".join(lines)


def run(config: SearchConfig) -> pa.Table:
    index = EmbeddingIndex.load(config.index)
    if config.ids_file:
        with open(config.ids_file) as f:
            queries = [line.strip() for line in f if line.strip()]
        result = index.search_listings(queries, config.k)
        pq.write_table(result, config.out)
        save_provenance(provenance_beside(config.out), config, **index.provenance_inputs())
        found = len(set(result.column("query_listing_id").to_pylist()))
        logger.info("%d of %d listings found in the index; %d neighbours -> %s", found, len(queries), result.num_rows, config.out)
        return result
    if config.listing_id:
        result = index.search_listing(config.listing_id, config.k)
        print(f"listings most similar to {config.listing_id}:")
    else:
        model = config.model or index.meta.get("model")
        if not model:
            raise ValueError("give --model: the index does not record which tagger made it")
        result = search_image(index, config.image, model, config.k)
        print(f"listings most similar to image {config.image}:")
    print(format_neighbours(result))  # the answer: stdout, so `mltag search ... > out.txt` holds only it
    return result
