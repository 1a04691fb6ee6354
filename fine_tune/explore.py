"""`python -m fine_tune.explore`: the command lives in fine_tune/commands/explore.py."""

from fine_tune.commands.explore import main

if __name__ == "__main__":
    main()
