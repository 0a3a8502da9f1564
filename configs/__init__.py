"""Experiment configs: each file defines ``get_config(smoke: bool) -> SweepConfig``.

Run one with ``python -m experiments.run_config configs/<name>.py [--smoke] [--out DIR]``.
"""
