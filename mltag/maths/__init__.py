"""Pure functions (numpy, no I/O, no model): metrics, per-tag thresholds, repeat-factor resampling,
and the curation maths (hierarchy checks, label issues, pseudo-labels, tag merges and pruning).
Each is tested against an independent reference.

Modules: ``metrics``, ``thresholds``, ``resampling``, ``hierarchy_checks``, ``label_issues``, ``pseudo_labels``, ``tag_merges``, ``tag_pruning``.
"""
