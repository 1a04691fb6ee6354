"""The training core: everything one training run needs, and nothing else.

config (options) -> data (files, labels, tokens, the step sampler) -> model -> optim ->
loop (setup, train, evaluate, save) with checkpoint (save, rotate, resume), metrics and
tracking; runs and comparison read back and tabulate what runs wrote, tables and
plots format it. The commands (fine_tune.commands) and the launchers (fine_tune.launchers) import
this package; it never imports them.
"""
