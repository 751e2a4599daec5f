"""Reproducible performance runs of psctl, side by side with plain-socket baselines.

Run ``python -m benchmarks [--quick] [--json FILE] [--only SECTION]``; see
BENCHMARKS.md for the figures and what they mean. Nothing here is a test.
"""
