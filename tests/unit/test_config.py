"""Options: YAML recipe + flags, types, bools, int-or-ratio warm-up, choices, JSON options,
and the one-line errors (with the closest valid name) that bad input gets."""

import pytest

from conftest import small_files
from fine_tune.core.config import ConfigError, config_from_dict, load_yaml, parse_args, save_config


@pytest.mark.parametrize("argv,expect", [
    (["--warmup_steps", "1.5"], "an int >= 0, or a float in [0, 1)"),
    (["--report_to", "tensorbord"], "did you mean 'tensorboard'"),
    (["--model_config_overrides", "{bad json"], "is not valid JSON"),
    (["--mixed_precision", "fp8"], "choose from no, bf16, fp16"),
    (["--group_by_length", "maybe"], "use true or false"),
])
def test_config_errors(argv, expect):
    with pytest.raises(ConfigError, match=None) as e:
        parse_args(argv)
    assert expect in str(e.value)


def test_yaml_recipe_and_flag_override(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("learning_rate: 3.0e-5\nper_device_train_batch_size: 8\ngroup_by_length: false\n")
    cfg = parse_args(["--config", str(recipe), "--per_device_train_batch_size", "4", "--torch_compile"])
    assert (cfg.learning_rate, cfg.per_device_train_batch_size, cfg.group_by_length, cfg.torch_compile) == \
        (3e-5, 4, False, True)
    recipe.write_text("learning_rte: 1e-4\n")
    with pytest.raises(ConfigError, match="unknown option 'learning_rte'.*did you mean 'learning_rate'"):
        parse_args(["--config", str(recipe)])


def test_warmup_steps_int_or_ratio():
    assert parse_args(["--warmup_steps", "0.1"]).warmup_steps_for(200) == 20
    assert parse_args(["--warmup_steps", "30"]).warmup_steps_for(200) == 30
    assert parse_args(["--warmup_ratio", "0.25"]).warmup_steps_for(200) == 50


def test_label_names_fix_the_order(tmp_path):
    from fine_tune.core import data as D

    files = small_files(tmp_path, 20, 9)
    cfg = parse_args(["--train_file", str(files["train"]), "--validation_file",
                      str(files["validation"]), "--label_names", "positive,neutral,negative"])
    assert D.infer_labels(D.load_raw_splits(cfg), cfg).names == ["positive", "neutral", "negative"]


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True), ("yes", True), ("on", True),
                                        ("false", False), ("FALSE", False), ("0", False), ("no", False),
                                        ("off", False)])
def test_bool_flags(text, value):
    assert parse_args(["--group_by_length", text]).group_by_length is value
    assert parse_args([f"--disable_tqdm={text}"]).disable_tqdm is value


def test_bare_bool_flag_is_true_and_defaults_stay(tmp_path):
    cfg = parse_args(["--gradient_checkpointing"])
    assert cfg.gradient_checkpointing is True and cfg.torch_compile is False and cfg.group_by_length is True
    recipe = tmp_path / "r.yaml"
    recipe.write_text("group_by_length: no\ndisable_tqdm: 'yes'\n")  # YAML's own bools and quoted words
    cfg = parse_args(["--config", str(recipe)])
    assert cfg.group_by_length is False and cfg.disable_tqdm is True


def test_warmup_count_ratio_and_their_limits():
    assert parse_args(["--warmup_steps", "5.0"]).warmup_steps == 5  # a whole float is a count
    assert isinstance(parse_args(["--warmup_steps", "5.0"]).warmup_steps, int)
    assert parse_args(["--warmup_steps", "0.5"]).warmup_steps == 0.5
    with pytest.raises(ConfigError, match="--warmup_ratio 1.0 is not allowed: must be in"):
        parse_args(["--warmup_ratio", "1.0"])
    with pytest.raises(ConfigError, match=r"--warmup_steps -1(\.0)? is not allowed: an int >= 0"):
        parse_args(["--warmup_steps", "-1"])


def test_unknown_flag_names_the_closest_option():
    with pytest.raises(ConfigError) as e:
        parse_args(["--learnig_rate", "1e-3"])
    assert str(e.value) == "unknown option --learnig_rate; did you mean --learning_rate?"
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        parse_args(["--zzzzzz", "1"])
    assert str(e.value) == "unknown option --zzzzzz"
    with pytest.raises(ConfigError, match="unknown option --learning"):  # no silent abbreviations
        parse_args(["--learning", "1e-3"])
    with pytest.raises(ConfigError, match="unexpected argument 'oops'"):
        parse_args(["oops"])


def test_types_and_ranges():
    with pytest.raises(ConfigError, match="--per_device_train_batch_size 'four' is not allowed: expected an integer"):
        parse_args(["--per_device_train_batch_size", "four"])
    with pytest.raises(ConfigError, match="--learning_rate 'fast' is not allowed: expected a number"):
        parse_args(["--learning_rate", "fast"])
    with pytest.raises(ConfigError, match="--learning_rate -0.1 is not allowed: must be > 0"):
        parse_args(["--learning_rate", "-0.1"])
    with pytest.raises(ConfigError, match="--gradient_accumulation_steps 0 is not allowed"):
        parse_args(["--gradient_accumulation_steps", "0"])
    with pytest.raises(ConfigError, match="--max_steps 2.5 is not allowed: expected an integer"):
        config_from_dict({"max_steps": 2.5})  # YAML gives floats as floats
    assert config_from_dict({"max_steps": 3.0}).max_steps == 3


def test_choices_from_flags_and_from_yaml(tmp_path):
    with pytest.raises(ConfigError) as e:
        parse_args(["--lr_scheduler_type", "cosin"])
    assert "--lr_scheduler_type 'cosin' is not allowed" in str(e.value) and "did you mean 'cosine'" in str(e.value)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("task: token-clasification\n")
    with pytest.raises(ConfigError, match="--task 'token-clasification' is not allowed.*'token-classification'"):
        parse_args(["--config", str(recipe)])
    assert parse_args(["--report_to", "tensorboard,wandb"]).trackers == ["tensorboard", "wandb"]
    assert parse_args(["--report_to", "all"]).trackers == ["tensorboard", "wandb"]
    assert parse_args(["--report_to", "jsonl"]).trackers == []


def test_json_options_from_flags_and_yaml_mappings(tmp_path):
    cfg = parse_args(["--lr_scheduler_kwargs", '{"step_size": 3, "gamma": 0.5}'])
    assert cfg.json_field("lr_scheduler_kwargs") == {"step_size": 3, "gamma": 0.5}
    assert cfg.json_field("model_config_overrides") == {}
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_config_overrides:\n  hidden_dropout_prob: 0.0\n  num_hidden_layers: 2\n")
    cfg = parse_args(["--config", str(recipe)])
    assert cfg.json_field("model_config_overrides") == {"hidden_dropout_prob": 0.0, "num_hidden_layers": 2}
    with pytest.raises(ConfigError, match="--lr_scheduler_kwargs .* must be a JSON object"):
        parse_args(["--lr_scheduler_kwargs", "[1, 2]"])
    with pytest.raises(ConfigError, match=r"--model_config_overrides is not valid JSON \(.* at column 2\)"):
        parse_args(["--model_config_overrides", "{bad json"])


def test_repeated_metric_flags_add_to_the_recipe(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("metric: [a]\n")
    trust = ["--trust_remote_code", "true"]  # metrics not built in run evaluate scripts
    assert parse_args(["--config", str(recipe), "--metric", "b", "--metric", "c", *trust]).metric == ["a", "b", "c"]
    assert parse_args(["--metric", "b", *trust]).metric == ["b"]


def test_best_metric_defaults_per_task():
    assert (parse_args([]).best_metric, parse_args([]).best_is_greater) == ("eval_accuracy", True)
    ner = parse_args(["--task", "token-classification"])
    assert (ner.best_metric, ner.best_is_greater) == ("eval_f1", True)
    reg = parse_args(["--task", "regression"])
    assert (reg.best_metric, reg.best_is_greater) == ("eval_mse", False)
    loss = parse_args(["--metric_for_best_model", "eval_loss"])
    assert (loss.best_metric, loss.best_is_greater) == ("eval_loss", False)
    assert parse_args(["--metric_for_best_model", "loss", "--greater_is_better", "true"]).best_is_greater is True


def test_eval_steps_default_to_logging_steps():
    assert parse_args(["--eval_strategy", "steps", "--logging_steps", "7"]).eval_steps == 7
    assert parse_args(["--eval_strategy", "steps", "--logging_steps", "1"]).eval_steps == 500
    assert parse_args(["--eval_strategy", "steps", "--eval_steps", "3"]).eval_steps == 3


def test_saved_config_reads_back_equal(tmp_path):
    """Resume compares a checkpoint's config.yaml with the new run's options."""
    cfg = parse_args(["--learning_rate", "3e-4", "--warmup_steps", "0.1", "--lr_scheduler_kwargs", '{"gamma": 0.5}',
                      "--metric", "a", "--trust_remote_code", "true", "--group_by_length", "false", "--max_train_samples", "10"])
    save_config(cfg, tmp_path / "config.yaml")
    assert config_from_dict(load_yaml(tmp_path / "config.yaml")) == cfg


def test_yaml_that_is_not_a_mapping_or_missing(tmp_path):
    bad = tmp_path / "list.yaml"
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="must be a mapping of option: value"):
        parse_args(["--config", str(bad)])
    with pytest.raises(ConfigError, match="no such file"):
        parse_args(["--config", str(tmp_path / "missing.yaml")])
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="is not valid YAML"):
        parse_args(["--config", str(broken)])
