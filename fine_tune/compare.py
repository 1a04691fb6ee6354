"""`python -m fine_tune.compare`: the command lives in fine_tune/commands/compare.py."""

from fine_tune.commands.compare import main

if __name__ == "__main__":
    main()
