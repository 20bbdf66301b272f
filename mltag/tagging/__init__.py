"""Tagging a catalog: the Ray Data pipeline and its inference actor, a run's commit, specialist
models chained behind the general one, and a tagger's scores for labelled rows. Shared by the
``tag``, ``reindex``, ``eval``/``calibrate``/``oof``/``curate`` and ``serve`` stages.

Modules: ``pipeline``, ``commits``, ``chain``, ``predict``.
"""
