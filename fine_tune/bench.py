"""`python -m fine_tune.bench`: the command lives in fine_tune/commands/bench.py."""

from fine_tune.commands.bench import main

if __name__ == "__main__":
    main()
