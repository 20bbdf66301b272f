"""The tag table: its row contract, its Delta Lake transactions, reading a version's files, runs
cut into resumable shards, and what a row's error means.

Modules: ``tag_table``, ``delta_table``, ``table_files``, ``sharded_run``, ``row_errors``.
"""
