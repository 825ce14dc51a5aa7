"""Benchmarks for the InPO training example; see `alignment_world.py` and `run_alignment.py`."""
