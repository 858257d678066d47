"""Benchmarks of infernode, run as scripts (``python bench/engine.py``); never timed tests."""
