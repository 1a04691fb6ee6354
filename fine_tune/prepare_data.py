"""`python -m fine_tune.prepare_data`: the command lives in fine_tune/commands/prepare_data.py."""

from fine_tune.commands.prepare_data import main

if __name__ == "__main__":
    main()
