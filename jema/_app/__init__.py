"""jema's app: the ``jema`` command line, the digits demo and its models, the benchmarks.

Imported only by the ``jema`` console script and ``python -m jema``; ``import jema`` never
loads it.
"""
