"""Fine-tune a Hugging Face model: `accelerate launch train.py --config recipes/sentiment.yaml`.

All options: `python train.py --help`. The loop lives in fine_tune/core/loop.py; `fine-tune train`
runs the same code.
"""

import sys

from fine_tune.__main__ import train_main

if __name__ == "__main__":
    train_main(sys.argv[1:], prog="train.py")
