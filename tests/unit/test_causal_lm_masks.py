"""--task causal-lm on hand-built examples: which tokens are targets for each data shape
(text, prompt + completion, chat messages), the loss units, and the summed loss.

In process, with the real encoder (tokenize_splits), collator and loss; the tokenizer is the
MiniLM one (BERT word pieces: [CLS] before a text, [SEP] as its end-of-sequence token), with a
small Jinja chat template set where the test needs one."""

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from conftest import minilm_path
from fine_tune.core.config import parse_args
from fine_tune.core.data import Collator, LabelInfo, tokenize_splits
from fine_tune.core.errors import UserError
from fine_tune.core.labels import IGNORE_INDEX
from fine_tune.core.tasks import TASKS, task_of_model

TASK = TASKS["causal-lm"]
# role marks around each turn; the generation prompt is the assistant's mark
TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
            "{% if add_generation_prompt %}<assistant> {% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(minilm_path())


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    chat = copy.deepcopy(tokenizer)
    chat.chat_template = TEMPLATE
    return chat


def encode(rows, tokenizer, max_length=64):
    from datasets import Dataset

    cfg = parse_args(["--task", "causal-lm", "--max_length", str(max_length)])
    splits = {"train": Dataset.from_list(rows)}
    TASK.read_labels(splits, cfg)
    return tokenize_splits(splits, tokenizer, cfg, LabelInfo([]), TASK)["train"]


def ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def targets(example):
    return [t for t in example["labels"] if t != IGNORE_INDEX]


def test_prompt_completion_trains_on_the_completion_and_eos_only(tokenizer):
    prompt, completion = "the film was a delight . sentiment :", " positive"
    (ex,) = encode([{"prompt": prompt, "completion": completion}], tokenizer)
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    p, c = ids(tokenizer, prompt), ids(tokenizer, completion)
    assert ex["input_ids"] == [cls] + p + c + [sep]
    assert ex["labels"] == [IGNORE_INDEX] * (1 + len(p)) + c + [sep]  # every prompt token -100
    assert ex["n_units"] == len(c) + 1  # the completion and the end-of-sequence token
    assert ex["length"] == len(ex["input_ids"])


def test_text_trains_on_every_token_but_the_first(tokenizer):
    text = "a quiet film about the sea and the people who love it"
    (ex,) = encode([{"text": text}], tokenizer)
    assert ex["input_ids"] == [tokenizer.cls_token_id] + ids(tokenizer, text) + [tokenizer.sep_token_id]
    assert ex["labels"] == ex["input_ids"]
    # the first token has nothing before it to predict it: one unit less than tokens
    assert ex["n_units"] == len(ex["input_ids"]) - 1


def test_messages_train_on_the_assistant_turns_only(chat_tokenizer):
    messages = [{"role": "system", "content": "you rate films"},
                {"role": "user", "content": "how was the plot"},
                {"role": "assistant", "content": "boring and slow"},
                {"role": "user", "content": "and the music"},
                {"role": "assistant", "content": "lovely"}]
    (ex,) = encode([{"messages": messages}], chat_tokenizer)
    tok = chat_tokenizer
    rendered = tok.apply_chat_template(messages, tokenize=False)
    assert tok.decode(ex["input_ids"][:-1]) == tok.decode(ids(tok, rendered))  # the whole conversation
    # the targets are each assistant turn's content (with what the template writes after it), then EOS
    expected = ids(tok, "boring and slow ") + ids(tok, "lovely ") + [tok.sep_token_id]
    assert targets(ex) == expected
    assert ex["n_units"] == len(expected)
    # no token of the system or user turns (nor the role marks) is a target
    trained_text = tok.decode(targets(ex))
    for word in ("rate", "plot", "music", "user", "assistant", "system"):
        assert word not in trained_text
    # the generation prompt before each answer is not a target: targets start right after it
    first = ex["labels"].index(expected[0])
    assert tok.decode(ex["input_ids"][:first]).endswith("< assistant >")


def test_a_conversation_ending_with_a_user_turn_does_not_train_its_eos(chat_tokenizer):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                {"role": "user", "content": "bye"}]
    (ex,) = encode([{"messages": messages}], chat_tokenizer)
    assert ex["labels"][-1] == IGNORE_INDEX and targets(ex) == ids(chat_tokenizer, "hello ")


def test_messages_without_a_chat_template_is_a_one_line_error(tokenizer):
    assert not tokenizer.chat_template
    with pytest.raises(UserError, match="has no chat template") as err:
        encode([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}],
               tokenizer)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("columns, message", [
    ({"prompt": "a"}, "no 'completion' column"),
    ({"completion": "a"}, "no 'prompt' column"),
    ({"review": "a"}, "none of the columns causal-lm reads"),
])
def test_incomplete_columns_are_errors(tokenizer, columns, message):
    with pytest.raises(UserError, match=message):
        encode([columns], tokenizer)


def test_a_long_prompt_loses_its_start_not_the_completion(tokenizer):
    (ex,) = encode([{"prompt": "one two three four five six", "completion": " seven eight nine"}], tokenizer,
                   max_length=8)
    c = ids(tokenizer, " seven eight nine")
    assert len(ex["input_ids"]) == len(ex["labels"]) == 8
    # [CLS], the prompt's last 3 words, the whole completion and EOS
    assert ex["input_ids"] == [tokenizer.cls_token_id] + ids(tokenizer, "four five six") + c + [tokenizer.sep_token_id]
    assert ex["n_units"] == len(c) + 1


def test_a_long_text_is_cut_at_its_end(tokenizer):
    (ex,) = encode([{"text": "one two three four five six seven eight nine ten"}], tokenizer, max_length=8)
    assert ex["input_ids"] == [tokenizer.cls_token_id] + ids(tokenizer, "one two three four five six seven")
    assert ex["n_units"] == 7


def test_summed_loss_is_the_mean_cross_entropy_times_the_target_count(tokenizer):
    """The loop divides each micro-batch's summed loss by the step's units: that is torch's mean
    next-token cross-entropy over the target tokens only if the sum and n_units agree, padding
    (labels -100) and the shift by one included."""
    rows = [{"prompt": "a " * n, "completion": " b" * m} for n, m in ((1, 1), (7, 3), (2, 12), (15, 1))]
    ds = encode(rows, tokenizer)
    cfg = parse_args(["--task", "causal-lm"])
    batch = Collator(tokenizer, cfg, TASK)([dict(ds[i]) for i in range(len(ds))])
    torch.manual_seed(0)
    logits = torch.randn(*batch["input_ids"].shape, 50) * 3
    labels = batch["labels"].clamp(max=49).where(batch["labels"] != IGNORE_INDEX, IGNORE_INDEX)
    summed = TASK.example_losses(logits, labels, batch["weight"])
    units = sum(ds["n_units"])
    assert units == sum(len(ids(tokenizer, r["completion"])) + 1 for r in rows)
    mean = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX)
    assert float(summed.sum()) == pytest.approx(float(mean) * units, rel=1e-6)
    # a stand-in (weight 0) adds nothing
    assert float(TASK.example_losses(logits, labels, torch.zeros(len(rows))).sum()) == 0.0


def test_per_micro_batch_normalisation_differs_from_the_step_mean():
    """Why the units are counted per step: two micro-batches of 1 and 40 target tokens. The mean
    over all 41 tokens weighs each token once; averaging the two micro-batch means weighs the one
    token like the 40 (the bug of transformers 34191). Their difference is far beyond the
    topology tests' 1e-4 tolerance, so those tests would catch it."""
    torch.manual_seed(0)
    per_token = [torch.rand(1) * 4, torch.rand(40)]  # uneven lengths, uneven losses
    step_mean = torch.cat(per_token).sum() / 41
    micro_means = sum(t.mean() for t in per_token) / 2
    assert abs(float(step_mean - micro_means)) / float(step_mean) > 0.1


def test_evaluation_metrics_and_best_model_direction():
    assert TASK.loss_metrics(math.log(20.0))["perplexity"] == pytest.approx(20.0)
    assert TASK.metric_names() == ["loss", "perplexity"]
    cfg = parse_args(["--task", "causal-lm"])
    assert cfg.best_metric == "eval_loss" and not cfg.best_is_greater
    assert not parse_args(["--task", "causal-lm", "--metric_for_best_model", "perplexity"]).best_is_greater


def test_a_saved_language_model_is_recognised():
    from transformers import LlamaConfig

    assert task_of_model(LlamaConfig(architectures=["LlamaForCausalLM"])) is TASK
    assert task_of_model(LlamaConfig(architectures=["GPT2LMHeadModel"])) is TASK
    assert task_of_model(LlamaConfig(architectures=["LlamaForSequenceClassification"])) is not TASK


def test_predict_says_in_one_line_that_it_does_not_generate_yet():
    with pytest.raises(UserError, match="does not generate text yet"):
        TASK.text_input("hello")


def test_the_sentiment_prompts_complete_with_the_label():
    from fine_tune.commands.prepare_data import build_sentiment_prompts

    (row,) = build_sentiment_prompts({"train": [{"text": "Lovely music.", "label": "positive", "rating": 2.1}]})["train"]
    assert row == {"prompt": "Review: Lovely music.\nSentiment:", "completion": " positive"}


# ------------------------------------------------------------------ --packing
@pytest.fixture(scope="module")
def tiny_llama(tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def packed_rows():
    words = "good bad film plot music the a was very not".split()
    return [{"prompt": " ".join(words[: 1 + i % 7]), "completion": " " + " ".join(words[: 1 + (3 * i) % 10])}
            for i in range(9)]


def per_example_losses(tiny_llama, batch, blocks) -> list[float]:
    """Each example's loss sum in a batch of packed ``blocks``, split where their positions restart
    (the padding after a block is no example)."""
    with torch.no_grad():
        logits = tiny_llama(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            attention_mask=batch.get("attention_mask"), **TASK.forward_options).logits
    per_token = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1),
                                reduction="none", ignore_index=IGNORE_INDEX).view(logits.shape[0], -1)
    out = []
    for row, block in enumerate(blocks):
        positions = block["position_ids"]
        starts = [i for i, p in enumerate(positions) if p == 0] + [len(positions)]
        # target t + 1 is predicted at t: an example's tokens [s, e) are targets s+1..e-1, losses s..e-2
        out += [float(per_token[row, s:e - 1].sum()) for s, e in zip(starts, starts[1:])]
    return out


def test_packing_concatenates_examples_with_restarting_positions(tokenizer):
    cfg = parse_args(["--task", "causal-lm", "--max_length", "24", "--packing", "true"])
    ds = encode(packed_rows(), tokenizer, max_length=24)
    packed = TASK.pack(ds, cfg)
    assert len(packed) < len(ds) and max(packed["length"]) <= 24
    assert sum(packed["n_units"]) == sum(ds["n_units"])  # the same loss units, so the same step means
    assert [t for b in packed["input_ids"] for t in b] == [t for e in ds["input_ids"] for t in e]
    for block in packed:
        assert block["position_ids"].count(0) >= 1 and block["labels"][0] == IGNORE_INDEX
        # each example's first token is no target: the previous example must not learn to predict it
        assert all(lab == IGNORE_INDEX for lab, pos in zip(block["labels"], block["position_ids"]) if pos == 0)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_packed_losses_equal_the_unpacked_ones(tokenizer, tiny_llama, attention):
    """Per-example losses of a packed batch (positions restarting, no attention across examples)
    equal those of each example alone, to 1e-5; with one causal mask over the whole block (what
    packing without the block-diagonal mask would do) they do not."""
    tiny_llama.config._attn_implementation = attention
    cfg = parse_args(["--task", "causal-lm", "--max_length", "40", "--packing", "true"])
    ds = encode(packed_rows(), tokenizer, max_length=40)
    alone = []
    for ex in ds:
        batch = Collator(tokenizer, cfg, TASK)([dict(ex)])
        with torch.no_grad():
            logits = tiny_llama(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone.append(float(TASK.example_losses(logits, batch["labels"], batch["weight"])))
    packed = TASK.pack(ds, cfg)
    batch = Collator(tokenizer, cfg, TASK)([dict(b) for b in packed])
    assert "attention_mask" not in batch and len(packed) > 1  # padded rows in one batch
    assert len(set(packed["length"])) > 1  # so some blocks are padded
    together = per_example_losses(tiny_llama, batch, packed)
    assert together == pytest.approx(alone, abs=1e-5)
    crossing = per_example_losses(tiny_llama, {**batch, "attention_mask": torch.ones_like(batch["input_ids"])},
                                  packed)
    assert max(abs(a - b) for a, b in zip(crossing, alone)) > 1e-3


def test_packing_is_only_for_language_models():
    from fine_tune.core.config import ConfigError

    with pytest.raises(ConfigError, match="--packing applies to causal-lm"):
        parse_args(["--task", "text-classification", "--packing", "true"]).validate()
