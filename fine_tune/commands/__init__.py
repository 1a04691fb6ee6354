"""Commands around a training run: prepare_data, explore, predict, compare, bench.

Each is a module with a ``main(argv)``; ``fine-tune NAME`` (or ``python -m fine_tune.NAME``)
runs it. They import the core, never the reverse.
"""
