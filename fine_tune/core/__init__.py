"""The training core: everything one training run needs, and nothing else.

config (options) -> tasks (what differs by task: one class each; labels, the helpers of their
label reading) -> data (files, tokens, the step sampler) -> model -> optim -> distributed (the
accelerator) -> loop (setup -> train -> save -> cleanup, as its docstring describes) with
evaluation, checkpoint (save, rotate, resume), metrics and tracking; runs and comparison read
back and tabulate what runs wrote, tables and plots format it. The commands (fine_tune.commands)
and the launchers (fine_tune.launchers) import this package; it never imports them.
"""
