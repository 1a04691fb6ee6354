"""`fine-tune COMMAND [options]`: one console command for everything around a training run.

    fine-tune train --config recipes/sentiment.yaml     # one process; for several: accelerate launch train.py
    fine-tune prepare-data                              # the default data sets into data/
    fine-tune explore --config recipes/sentiment.yaml   # label balance, lengths, truncation, samples
    fine-tune predict --model runs/sentiment/final --text "What a lovely day"
    fine-tune export runs/sentiment/checkpoints/step_400 model_400   # a plain model from a checkpoint
    fine-tune compare runs/*                            # one table (and a plot) of finished runs
    fine-tune bench                                     # throughput against the transformers Trainer
    fine-tune submit --nodes 2 -- --config recipes/sentiment.yaml   # Slurm (submitit)

`fine-tune COMMAND --help` lists each command's options.
"""

from __future__ import annotations

import importlib
import sys

# command -> module with a main(argv); imported only when chosen, so `fine-tune --help` is instant
COMMANDS = {
    "train": None,  # train_main below: train.py's own entry point
    "prepare-data": "fine_tune.commands.prepare_data",
    "explore": "fine_tune.commands.explore",
    "predict": "fine_tune.commands.predict",
    "export": "fine_tune.commands.export",
    "compare": "fine_tune.commands.compare",
    "bench": "fine_tune.commands.bench",
    "submit": "fine_tune.launchers.slurm",
}


def train_main(argv: list[str], prog: str = "fine-tune train") -> None:
    """train.py's entry point, for `fine-tune train` (the same code as `python train.py`)."""
    # first, before torch and the data are imported (seconds): a stop signal during start-up
    # is then remembered and acted on, instead of killing the process
    from fine_tune.core.signals import install_stop_handlers

    install_stop_handlers()
    from fine_tune.core.config import main_guard, parse_args

    @main_guard
    def run() -> None:
        cfg = parse_args(argv, prog=prog)
        from fine_tune import EXIT_CHECKPOINTED
        from fine_tune.core.loop import run as run_training

        outcome = run_training(cfg)
        if outcome.checkpointed:  # stopped by a signal, a checkpoint saved: "requeue me"
            sys.exit(EXIT_CHECKPOINTED)

    run()


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        print(f"error: unknown command {name!r}: choose from {', '.join(COMMANDS)}{hint}", file=sys.stderr)
        sys.exit(2)
    if name == "train":
        train_main(rest)
        return
    importlib.import_module(COMMANDS[name]).main(rest)


if __name__ == "__main__":
    main()
