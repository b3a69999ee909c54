"""Recipe configuration: YAML defaults, command-line overrides and the errors for bad input."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from hf_dp_microadam.recipes.arguments import DataArguments, LoraArguments, ModelArguments, RecipeTrainingArguments
from hf_dp_microadam.recipes.config import ConfigError, parse_recipe_args
from recipe_scripts import CONFIGS_DIR, load_recipe_module

RECIPE_TYPES = (ModelArguments, DataArguments, LoraArguments, RecipeTrainingArguments)


@dataclass
class ToyArguments:
    name: str = field(metadata={"help": "required"})
    rate: float = 0.5
    steps: int = 3
    verbose: bool = False
    enabled: bool = True
    modules: list[str] | None = None
    sizes: list[int] = field(default_factory=lambda: [1, 2])


def write_config(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_yaml_values_become_defaults(tmp_path):
    config = write_config(tmp_path, "name: toy\nrate: 1.0e-3\nsteps: 7\nmodules: [query, value]\n")
    (args,) = parse_recipe_args((ToyArguments,), [config])
    assert args.name == "toy"
    assert args.rate == 1e-3
    assert args.steps == 7
    assert args.modules == ["query", "value"]
    assert args.sizes == [1, 2]


def test_yaml_exponent_without_dot_is_a_float(tmp_path):
    # PyYAML reads 3e-4 as a string; the option's type converts it.
    config = write_config(tmp_path, "name: toy\nrate: 3e-4\n")
    (args,) = parse_recipe_args((ToyArguments,), [config])
    assert args.rate == pytest.approx(3e-4)


def test_command_line_wins_over_yaml(tmp_path):
    config = write_config(tmp_path, "name: toy\nrate: 0.1\nsteps: 7\n")
    (args,) = parse_recipe_args((ToyArguments,), [config, "--rate", "0.25", "--steps=9", "--name", "other"])
    assert args.rate == 0.25
    assert args.steps == 9
    assert args.name == "other"


@pytest.mark.parametrize(
    ("overrides", "verbose"),
    [([], True), (["--verbose", "false"], False), (["--verbose", "no"], False), (["--verbose"], True)],
)
def test_boolean_overrides(tmp_path, overrides, verbose):
    config = write_config(tmp_path, "name: toy\nverbose: true\n")
    (args,) = parse_recipe_args((ToyArguments,), [config, *overrides])
    assert args.verbose is verbose


def test_boolean_true_default_can_be_switched_off(tmp_path):
    config = write_config(tmp_path, "name: toy\n")
    (args,) = parse_recipe_args((ToyArguments,), [config, "--enabled", "false"])
    assert args.enabled is False
    (args,) = parse_recipe_args((ToyArguments,), [config, "--no_enabled"])
    assert args.enabled is False


def test_list_overrides(tmp_path):
    config = write_config(tmp_path, "name: toy\nmodules: [query]\nsizes: [4]\n")
    (args,) = parse_recipe_args((ToyArguments,), [config, "--modules", "q_proj", "v_proj", "--sizes", "8", "16"])
    assert args.modules == ["q_proj", "v_proj"]
    assert args.sizes == [8, 16]


def test_yaml_scalar_for_list_option_becomes_list(tmp_path):
    config = write_config(tmp_path, "name: toy\nmodules: classifier\n")
    (args,) = parse_recipe_args((ToyArguments,), [config])
    assert args.modules == ["classifier"]


def test_unknown_yaml_key_suggests_closest(tmp_path):
    config = write_config(tmp_path, "name: toy\nlearnig_rate: 0.1\nstep: 2\n")
    with pytest.raises(ConfigError) as error:
        parse_recipe_args((ToyArguments,), [config])
    message = str(error.value)
    assert "unknown keys" in message
    assert "'learnig_rate'" in message
    assert "did you mean 'steps'?" in message


def test_unknown_yaml_key_of_recipe_suggests_option(tmp_path):
    config = write_config(
        tmp_path,
        "model_name_or_path: m\ndataset_name: d\noutput_dir: out\ntarget_epsilon: 8\ntarget_epsilom: 3\n",
    )
    with pytest.raises(ConfigError, match="did you mean 'target_epsilon'"):
        parse_recipe_args(RECIPE_TYPES, [config])


def test_unknown_command_line_option_suggests_closest(tmp_path):
    config = write_config(tmp_path, "name: toy\n")
    with pytest.raises(ConfigError) as error:
        parse_recipe_args((ToyArguments,), [config, "--ratee", "0.1"])
    assert "'--ratee'" in str(error.value)
    assert "did you mean 'rate'?" in str(error.value)
    assert "'0.1'" not in str(error.value)


def test_stray_command_line_value_is_named(tmp_path):
    config = write_config(tmp_path, "name: toy\n")
    with pytest.raises(ConfigError, match="'0.2' \\(a value that no option takes\\)"):
        parse_recipe_args((ToyArguments,), [config, "--rate", "0.1", "0.2"])


def test_option_prefix_is_not_accepted(tmp_path):
    config = write_config(tmp_path, "name: toy\n")
    with pytest.raises(ConfigError, match="--rat"):
        parse_recipe_args((ToyArguments,), [config, "--rat", "0.1"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        parse_recipe_args((ToyArguments,), [str(tmp_path / "absent.yaml")])


def test_config_file_is_required_first(tmp_path):
    with pytest.raises(ConfigError, match="first argument must be a YAML config file"):
        parse_recipe_args((ToyArguments,), ["--rate", "0.1"])
    with pytest.raises(ConfigError, match="first argument must be a YAML config file"):
        parse_recipe_args((ToyArguments,), [])


def test_invalid_yaml(tmp_path):
    config = write_config(tmp_path, "name: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        parse_recipe_args((ToyArguments,), [config])


def test_yaml_must_be_a_mapping(tmp_path):
    config = write_config(tmp_path, "- name\n- rate\n")
    with pytest.raises(ConfigError, match="must contain a mapping"):
        parse_recipe_args((ToyArguments,), [config])


def test_invalid_command_line_value(tmp_path):
    config = write_config(tmp_path, "name: toy\n")
    with pytest.raises(ConfigError, match="invalid int value"):
        parse_recipe_args((ToyArguments,), [config, "--steps", "many"])


@pytest.mark.parametrize("line, message", [
    ("steps: many", "invalid value for 'steps' in .*config.yaml: 'many' is not an integer"),
    ("rate: fast", "'rate' .*'fast' is not a number"),
    ("verbose: maybe", "'verbose' .*'maybe' is not a boolean"),
    ("sizes: [1, two]", "'sizes' .*'two' is not an integer"),
])
def test_invalid_yaml_value_names_file(tmp_path, line, message):
    config = write_config(tmp_path, f"name: toy\n{line}\n")
    with pytest.raises(ConfigError, match=message):
        parse_recipe_args((ToyArguments,), [config])


def test_dataclass_error_names_source(tmp_path):
    config = write_config(
        tmp_path, "model_name_or_path: m\ndataset_name: d\noutput_dir: out\ntarget_epsilon: 8\nlora_r: 0\n"
    )
    with pytest.raises(ConfigError, match=r"^lora_r must be at least 1, got 0 \(from .*config.yaml\)$"):
        parse_recipe_args(RECIPE_TYPES, [config])
    with pytest.raises(ConfigError, match=r"^lora_r .* \(from .*config.yaml, with --lora_alpha on the command line\)$"):
        parse_recipe_args(RECIPE_TYPES, [config, "--lora_alpha", "4"])


def test_missing_required_option(tmp_path):
    config = write_config(tmp_path, "rate: 0.1\n")
    with pytest.raises(ConfigError, match="--name"):
        parse_recipe_args((ToyArguments,), [config])


def test_dp_argument_check_is_reported(tmp_path):
    config = write_config(
        tmp_path,
        "model_name_or_path: m\ndataset_name: d\noutput_dir: out\ntarget_epsilon: 8\nmax_grad_norm: 1.0\n",
    )
    with pytest.raises(ConfigError, match="per_sample_max_grad_norm"):
        parse_recipe_args(RECIPE_TYPES, [config])


def test_invalid_choice_in_yaml(tmp_path):
    config = write_config(
        tmp_path, "model_name_or_path: m\ndataset_name: d\noutput_dir: out\ntarget_epsilon: 8\nfinetuning: half\n"
    )
    with pytest.raises(ConfigError, match="finetuning='half'"):
        parse_recipe_args(RECIPE_TYPES, [config])


def test_recipe_arguments_from_yaml_and_overrides(tmp_path):
    config = write_config(
        tmp_path,
        "model_name_or_path: all-minilm-l6-v2\ndataset_name: rotten-tomatoes\noutput_dir: out\n"
        "target_epsilon: 8\nlogical_batch_size: 256\nlora_target_modules: [query, value]\nuse_cpu: true\n",
    )
    model, data, lora, training = parse_recipe_args(
        RECIPE_TYPES, [config, "--target_epsilon", "3", "--max_train_samples", "100", "--overwrite_output_dir"]
    )
    assert model.model_name_or_path == "all-minilm-l6-v2"
    assert model.finetuning == "lora"
    assert data.max_samples_per_split() == {"train": 100}
    assert lora.lora_target_modules == ["query", "value"]
    assert training.target_epsilon == 3.0
    assert training.logical_batch_size == 256
    assert training.overwrite_output_dir is True


RECIPE_OF_CONFIG_DIR = {
    "text_classification": "text_classification",
    "image_classification": "image_classification",
    "causal_lm": "causal_lm_lora",
}
SHIPPED_CONFIGS = sorted(
    path.relative_to(CONFIGS_DIR) for folder in RECIPE_OF_CONFIG_DIR for path in (CONFIGS_DIR / folder).glob("*.yaml")
)


@pytest.mark.parametrize("config", SHIPPED_CONFIGS, ids=str)
def test_shipped_configs_parse(config):
    recipe = load_recipe_module(RECIPE_OF_CONFIG_DIR[config.parts[0]])
    # GPU configs set bf16 on a GPU, which TrainingArguments rejects on a CPU-only machine.
    overrides = ["--use_cpu", "true", "--bf16", "false"] if config.name.startswith("gpu") else []
    parsed = parse_recipe_args(recipe.ARGUMENT_TYPES, [str(CONFIGS_DIR / config), *overrides])
    training = parsed[-1]
    assert training.target_epsilon is not None or training.noise_multiplier is not None
    assert training.output_dir.startswith("outputs/")


def test_every_recipe_has_a_cpu_config():
    for folder in RECIPE_OF_CONFIG_DIR:
        assert (CONFIGS_DIR / folder / "cpu.yaml").is_file(), folder


def test_text_recipe_classifier_pooling():
    recipe = load_recipe_module("text_classification")
    config = str(CONFIGS_DIR / "text_classification" / "cpu.yaml")

    with pytest.raises(ConfigError, match="classifier_pooling must be one of mean, or none .*; got 'max'"):
        parse_recipe_args(recipe.ARGUMENT_TYPES, [config, "--classifier_pooling", "max"])
    parsed = parse_recipe_args(recipe.ARGUMENT_TYPES, [config, "--classifier_pooling", "mean"])
    assert parsed[3].classifier_pooling == "mean"
    parsed = parse_recipe_args(recipe.ARGUMENT_TYPES, [config, "--classifier_pooling", "none"])
    assert parsed[3].classifier_pooling is None
