"""Fine-tune a Hugging Face model: `accelerate launch train.py --config recipes/sentiment.yaml`.

All options: `python train.py --help`. The loop lives in fine_tune/loop.py.
"""

from fine_tune.config import main_guard, parse_args


@main_guard
def main() -> None:
    cfg = parse_args()
    from fine_tune.loop import run  # heavy imports only after the options are valid

    run(cfg)


if __name__ == "__main__":
    main()
