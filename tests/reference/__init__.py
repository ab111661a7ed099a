"""Single-process reference implementations of the published aggregation rules.

Written from the papers' formulas with plain loops over dense float64 vectors; they share
no code with ``aggregator/`` and serve as the oracle for golden tests.
"""
