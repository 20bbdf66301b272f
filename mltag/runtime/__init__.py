"""Where and how work runs: joining Ray (``cluster``), one console format (``log``), and what of
Ray's console output mltag turns down (``ray_console``).

Modules: ``cluster``, ``log``, ``ray_console``.
"""
