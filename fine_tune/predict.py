"""`python -m fine_tune.predict`: the command lives in fine_tune/commands/predict.py."""

from fine_tune.commands.predict import main

if __name__ == "__main__":
    main()
