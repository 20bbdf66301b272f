"""mltag: multi-label tagging, embeddings and similarity search for very large image catalogs.

The pipeline, in module order: ``catalog`` (manifest) + ``vocabulary`` -> ``images`` (fetch and
decode) -> ``model`` (timm tagger) + ``losses`` + ``metrics`` -> ``train`` (Ray Train) -> ``tag``
(Ray Data) -> ``tag_table`` (Parquet contract) -> ``index`` (FAISS search).
"""

__version__ = "0.1.0"
