"""Stages: one module per step of UP2You, each run as its own process (`python -m stages.<name> JOB`).

This package's contract modules (`plan`, `spec`, `jobfs`) are torch-free; the
stage modules and `harness` import torch.
"""
