"""Benchmarks of codistill_ds, run as modules from the checkout root:

    .venv/bin/python -m benchmarks.comm --out runs/comm --quick
    .venv/bin/python -m benchmarks.quality --data ../shared/data/tinyshakespeare.txt --out runs/quality --quick
    .venv/bin/python -m benchmarks.data --out runs/data_memory

Each writes JSON + PNG results; RESULTS.md holds the recorded ones with their commands.
"""
