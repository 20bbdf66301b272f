"""One module per ``mltag`` subcommand, each a typed config and ``run(config)`` (the CLI and
``jobs/*.py`` call the same function), plus what only stages share: ``predict`` (scores for a
labelled manifest through the tagging pipeline), ``chain`` (specialist models triggered by
general tags) and ``curation_report``.

Modules: ``anomalies``, ``apply_head``, ``calibrate``, ``curate``, ``demo``, ``duplicates``, ``evaluate``, ``folds``, ``history``, ``index_build``, ``index_search``, ``index_update``, ``oof``, ``reindex``, ``report``, ``sample``, ``serve``, ``tag``, ``train``, ``train_head``, ``curation_report``, ``predict``, ``chain``.
"""
