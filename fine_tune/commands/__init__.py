"""Commands around a training run: prepare_data, explore, predict, compare, bench.

Each is a module with a ``main(argv)``; ``fine-tune NAME`` runs it
(fine_tune/__main__.py). They import the core, never the reverse.
"""
