"""The loss scaling of the training loop: for every topology, the gradient summed over a
step's micro-batches (and averaged over ranks, as DDP's all-reduce does) equals the gradient
of the step's mean loss, a short uneven last step with weight-0 stand-ins included.

In process: the data pipeline (tokenize_splits, StepSampler, StepLoader, Collator), the loss
(example_losses) and accelerate's ``Accelerator.backward`` are the real ones; the ranks are
simulated one after another in this process and their gradients averaged by hand (the real
all-reduce runs in tests/test_topologies.py). The scale is the loop's:
``loss_sum x world x accumulation / step_units``, and accelerate divides by accumulation."""

import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import LABELS, make_rows, minilm_path
from fine_tune.core.config import parse_args
from fine_tune.core.data import Collator, IndexedDataset, LabelInfo, StepLoader, StepSampler, tokenize_splits
from fine_tune.core.model import example_losses

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# (micro_batch, accumulation, world); 13 examples: full steps and a short one whose
# micro-steps leave some ranks with a weight-0 stand-in
TOPOLOGIES = [(8, 1, 1), (4, 2, 1), (2, 2, 2), (1, 4, 2), (3, 1, 3), (2, 3, 1)]
N_EXAMPLES = 13


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


def ner_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    words = "Anna Berlin went to the old market in Paris with John Smith yesterday".split()
    return [{"tokens": (ws := [rng.choice(words) for _ in range(rng.randint(1, 12))]),
             "tags": [rng.choice(TAGS) for _ in ws]} for _ in range(n)]


TASKS = {
    "text-classification": (lambda: make_rows(N_EXAMPLES, seed=3, max_words=25), LABELS),
    "token-classification": (lambda: ner_rows(N_EXAMPLES), TAGS),
    "regression": (lambda: [{**r, "label": float(i % 5) / 2} for i, r in
                            enumerate(make_rows(N_EXAMPLES, seed=4, max_words=25))], []),
}


@pytest.fixture(scope="module", params=list(TASKS))
def setup(request, tokenizer):
    """Tokenized data, a collator and a tiny model (dropout off) for one task."""
    from datasets import Dataset
    from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification

    task = request.param
    rows, names = TASKS[task]
    cfg = parse_args(["--task", task, "--max_length", "32"])
    ds = tokenize_splits({"train": Dataset.from_list(rows())}, tokenizer, cfg, LabelInfo(names))["train"]
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=16, num_hidden_layers=1,
                        num_attention_heads=2, intermediate_size=32, max_position_embeddings=64,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=max(len(names), 1))
    cls = BertForTokenClassification if task == "token-classification" else BertForSequenceClassification
    model = cls(config).eval()
    return {"task": task, "ds": ds, "collator": Collator(tokenizer, cfg), "model": model}


def accelerator_with(accumulation: int):
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    accelerator = Accelerator(gradient_accumulation_steps=accumulation, cpu=True)
    assert accelerator.gradient_accumulation_steps == accumulation
    return accelerator


def grads(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def loop_gradient(s, micro, acc, world, step_index, scaled=True) -> tuple[torch.Tensor, int]:
    """The gradient the loop applies at one optimizer step: each rank's micro-batch losses,
    scaled as the loop scales them, through accelerator.backward; then the mean over ranks.
    ``scaled=False`` is the classic bug (each micro-batch's own mean loss), for contrast."""
    model, accelerator = s["model"], accelerator_with(acc)
    per_rank, n_micro = [], set()
    for rank in range(world):
        sampler = StepSampler(s["ds"]["length"], s["ds"]["n_units"], micro, acc, world, rank, seed=5,
                              group_by_length=True)
        step = next(StepLoader(s["ds"], sampler, s["collator"]).iterate(epoch=1, start_step=step_index))
        n_micro.add(len(step.micro_batches))
        model.zero_grad(set_to_none=True)
        for batch in step.micro_batches:
            weight, target = batch.pop("weight"), batch.pop("labels")
            losses = example_losses(model(**batch).logits, target, weight, s["task"])
            if scaled:
                accelerator.backward(losses.sum() * (world * accelerator.gradient_accumulation_steps / step.units))
            else:
                units = weight.sum() if s["task"] != "token-classification" else (target != -100).sum()
                accelerator.backward(losses.sum() / units.clamp(min=1))
        per_rank.append(grads(model))
    assert len(n_micro) == 1, "every rank must run the same number of micro-batches"
    return torch.stack(per_rank).mean(0), n_micro.pop()


def mean_loss_gradient(s, step_examples: np.ndarray) -> torch.Tensor:
    """The target: one batch of the whole step, torch's own mean loss, plain backward."""
    model = s["model"]
    model.zero_grad(set_to_none=True)
    batch = s["collator"]([IndexedDataset(s["ds"])[int(i)] for i in step_examples])
    batch.pop("weight")
    target = batch.pop("labels")
    logits = model(**batch).logits
    if s["task"] == "regression":
        loss = F.mse_loss(logits.squeeze(-1), target)
    else:  # mean over examples, or over labelled tokens (-100 ignored)
        loss = F.cross_entropy(logits.flatten(0, -2), target.flatten(), ignore_index=-100)
    loss.backward()
    return grads(model)


@pytest.mark.parametrize("micro,acc,world", TOPOLOGIES)
def test_micro_batch_gradients_sum_to_the_step_mean_gradient(setup, micro, acc, world):
    sampler = StepSampler(setup["ds"]["length"], setup["ds"]["n_units"], micro, acc, world, 0, seed=5,
                          group_by_length=True)
    steps = sampler.epoch_steps(1)
    sizes = [len(s) for s in steps]
    assert sum(sizes) == N_EXAMPLES and min(sizes) < micro * acc * world  # a short step among them
    for index, examples in enumerate(steps):
        want = mean_loss_gradient(setup, examples)
        got, n_micro = loop_gradient(setup, micro, acc, world, index)
        assert n_micro == -(-len(examples) // (micro * world))  # a short step has fewer micro-batches
        scale = float(want.abs().max())
        assert float((got - want).abs().max()) < 1e-5 * scale, (setup["task"], index)


@pytest.mark.parametrize("micro,acc,world", [(2, 2, 2), (1, 4, 2)])
def test_per_micro_batch_mean_would_be_caught(setup, micro, acc, world):
    """Contrast: averaging each micro-batch on its own (the bug of transformers before
    PR #34191) gives another gradient on these uneven steps, and the comparison above sees it."""
    sampler = StepSampler(setup["ds"]["length"], setup["ds"]["n_units"], micro, acc, world, 0, seed=5,
                          group_by_length=True)
    worst = 0.0
    for index, examples in enumerate(sampler.epoch_steps(1)):
        want = mean_loss_gradient(setup, examples)
        got, _ = loop_gradient(setup, micro, acc, world, index, scaled=False)
        worst = max(worst, float((got - want).abs().max()) / float(want.abs().max()))
    assert worst > 1e-2
