"""Run control of the recipes: checkpoint detection, output files, plots, trainable parameters."""

from __future__ import annotations

import json
import math
import os
import struct
from types import SimpleNamespace

import datasets
import pytest
import torch
from transformers import BertConfig, BertForSequenceClassification

from hf_dp_microadam.engine import DPSettingsChangedError
from hf_dp_microadam.recipes import run
from hf_dp_microadam.recipes.arguments import LoraArguments, ModelArguments
from hf_dp_microadam.recipes.config import ConfigError
from hf_dp_microadam.recipes.classification import label_settings
from hf_dp_microadam.recipes.data import CausalLMCollator
from hf_dp_microadam.recipes.environment import configure_environment, uses_only_offline_assets
from hf_dp_microadam.recipes.modeling import prepare_trainable_model
from hf_dp_microadam.recipes.plots import plot_training_curves, training_curve_series


def run_args(output_dir, **overrides):
    settings = dict(output_dir=str(output_dir), resume_from_checkpoint=None, overwrite_output_dir=False,
                    should_save=True)
    settings.update(overrides)
    return SimpleNamespace(**settings)


def make_checkpoint(output_dir, step: int, max_steps: int = 10):
    folder = output_dir / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "max_steps": max_steps}))
    return folder


# ---- checkpoint detection ----


def test_fresh_run_without_output_dir(tmp_path):
    assert run.detect_last_checkpoint(run_args(tmp_path / "new")) is None


def test_empty_output_dir_starts_fresh(tmp_path):
    assert run.detect_last_checkpoint(run_args(tmp_path)) is None


def test_resumes_from_last_checkpoint(tmp_path):
    make_checkpoint(tmp_path, 5)
    last = make_checkpoint(tmp_path, 10)
    assert run.detect_last_checkpoint(run_args(tmp_path)) == str(last)


def test_explicit_checkpoint_wins(tmp_path):
    make_checkpoint(tmp_path, 10)
    assert run.detect_last_checkpoint(run_args(tmp_path, resume_from_checkpoint="elsewhere")) == "elsewhere"


def test_overwrite_deletes_checkpoints(tmp_path):
    make_checkpoint(tmp_path, 5)
    (tmp_path / "metrics.json").write_text("{}")
    assert run.detect_last_checkpoint(run_args(tmp_path, overwrite_output_dir=True)) is None
    assert not list(tmp_path.glob("checkpoint-*"))
    assert (tmp_path / "metrics.json").exists()


def test_output_dir_with_files_but_no_checkpoint_is_an_error(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    with pytest.raises(ConfigError, match="overwrite_output_dir"):
        run.detect_last_checkpoint(run_args(tmp_path))


def test_final_checkpoint_detection(tmp_path):
    assert not run.is_final_checkpoint(None)
    assert not run.is_final_checkpoint(str(make_checkpoint(tmp_path, 4, max_steps=10)))
    assert run.is_final_checkpoint(str(make_checkpoint(tmp_path, 10, max_steps=10)))


def test_finished_run_reports_saved_metrics(tmp_path, capsys):
    checkpoint = make_checkpoint(tmp_path, 10, max_steps=10)
    run.write_json(tmp_path / run.METRICS_FILE, {"test_accuracy": 0.75, "epsilon": 7.9})
    metrics = run.report_finished_run(run_args(tmp_path, should_log=True), str(checkpoint), ("test_accuracy", "epsilon"))
    assert metrics["test_accuracy"] == 0.75
    printed = capsys.readouterr().out
    assert "test_accuracy : 0.75" in printed
    assert "epsilon       : 7.9" in printed


def test_finished_run_warns_about_changed_settings(tmp_path, caplog):
    checkpoint = make_checkpoint(tmp_path, 10, max_steps=10)
    run.write_json(tmp_path / run.METRICS_FILE, {"epsilon": 7.9, "target_epsilon": 8, "dp_optimizer": "dp-microadam",
                                                 "expected_batch_size": 256})
    args = run_args(tmp_path, should_log=False, target_epsilon=3.0, dp_optimizer="dp-microadam",
                    logical_batch_size=256)
    with caplog.at_level("WARNING", logger="hf_dp_microadam.recipes.run"):
        run.report_finished_run(args, str(checkpoint), ("epsilon",))

    assert "target_epsilon: 8 -> 3.0" in caplog.text
    assert "dp_optimizer" not in caplog.text


def test_finished_run_names_changed_options(tmp_path, caplog):
    checkpoint = make_checkpoint(tmp_path, 10, max_steps=10)
    run.write_json(tmp_path / run.METRICS_FILE, {"epsilon": 7.9})
    finished = {"learning_rate": 0.003, "classifier_pooling": "mean", "output_dir": "old", "seed": 42}
    run.write_json(tmp_path / run.OPTIONS_FILE, finished)
    requested = {**finished, "learning_rate": 0.001, "classifier_pooling": None, "output_dir": str(tmp_path)}

    with caplog.at_level("WARNING", logger="hf_dp_microadam.recipes.run"):
        run.report_finished_run(run_args(tmp_path, should_log=False), str(checkpoint), ("epsilon",), requested)

    assert "(classifier_pooling: 'mean' -> None, learning_rate: 0.003 -> 0.001)" in caplog.text
    assert "output_dir: " not in caplog.text


def test_recipe_options_merge_dataclasses():
    options = run.recipe_options((ModelArguments(model_name_or_path="m"), LoraArguments(lora_r=4)))

    assert options["model_name_or_path"] == "m"
    assert options["lora_r"] == 4
    assert options["finetuning"] == "lora"
    assert json.loads(json.dumps(options)) == options


def test_finished_run_without_metrics_is_an_error(tmp_path):
    checkpoint = make_checkpoint(tmp_path, 10, max_steps=10)
    with pytest.raises(FileNotFoundError, match="overwrite_output_dir"):
        run.report_finished_run(run_args(tmp_path, should_log=True), str(checkpoint), ("epsilon",))


def test_write_json_turns_infinity_into_string(tmp_path):
    path = run.write_json(tmp_path / "out.json", {"epsilon": math.inf, "nested": {"values": [1.0, math.nan]}})
    assert json.loads(path.read_text()) == {"epsilon": "inf", "nested": {"values": [1.0, "nan"]}}


# ---- plots ----


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    return struct.unpack(">II", data[16:24])


SYNTHETIC_HISTORY = [
    {"loss": 0.69, "epsilon": 1.5, "step": 5},
    {"loss": 0.60, "epsilon": 3.0, "step": 10},
    {"eval_loss": 0.62, "eval_accuracy": 0.70, "step": 10},
    {"loss": float("nan"), "epsilon": 4.2, "step": 15},
    {"loss": 0.55, "epsilon": 5.0, "step": 20},
    {"eval_loss": 0.58, "eval_accuracy": 0.74, "step": 20},
    {"train_runtime": 12.0, "step": 20},
]


def test_plot_writes_png_with_one_panel_per_series(tmp_path):
    four = plot_training_curves(SYNTHETIC_HISTORY, tmp_path / "four.png", metric="eval_accuracy", title="run")
    three = plot_training_curves(SYNTHETIC_HISTORY, tmp_path / "three.png")
    assert four.stat().st_size > 1000
    width_four, height_four = png_size(four)
    width_three, height_three = png_size(three)
    assert height_four == height_three
    assert width_four > width_three


def test_plot_keeps_empty_panels(tmp_path):
    # A 3-step run with logging_steps=5 logs no loss and no epsilon, only the final summary.
    history = [{"eval_loss": 0.62, "eval_accuracy": 0.70, "step": 3}, {"train_loss": 0.66, "step": 3}]

    panels = training_curve_series(history, "eval_accuracy")
    path = plot_training_curves(history, tmp_path / "short.png", metric="eval_accuracy")
    full = plot_training_curves(SYNTHETIC_HISTORY, tmp_path / "full.png", metric="eval_accuracy")

    assert list(panels) == ["loss", "eval_loss", "eval_accuracy", "epsilon"]
    assert panels["loss"][1:] == ([3], [0.66])
    assert panels["epsilon"][1:] == ([], [])
    assert png_size(path) == png_size(full)


def test_plot_creates_parent_folder(tmp_path):
    path = plot_training_curves(SYNTHETIC_HISTORY, tmp_path / "a" / "b" / "curves.png")
    assert path.is_file()


def test_plot_rejects_history_without_series(tmp_path):
    with pytest.raises(ValueError, match="no loss"):
        plot_training_curves([{"train_runtime": 1.0, "step": 3}], tmp_path / "empty.png")
    assert not (tmp_path / "empty.png").exists()


# ---- data and labels ----


def test_causal_lm_collator_keeps_eos_when_pad_is_eos():
    tokenizer = SimpleNamespace(pad_token_id=2)
    batch = CausalLMCollator(tokenizer)([{"input_ids": [5, 6, 2]}, {"input_ids": [7, 2]}])
    assert batch["input_ids"].tolist() == [[5, 6, 2], [7, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]
    assert batch["labels"].tolist() == [[5, 6, 2], [7, 2, -100]]


def test_causal_lm_collator_needs_pad_token():
    with pytest.raises(ValueError, match="no pad token"):
        CausalLMCollator(SimpleNamespace(pad_token_id=None))


def test_label_settings_from_class_label():
    dataset = datasets.Dataset.from_dict(
        {"label": [0, 1, 1]}, features=datasets.Features({"label": datasets.ClassLabel(names=["neg", "pos"])})
    )
    assert label_settings(dataset) == {
        "num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1}
    }


def test_label_settings_from_integers():
    assert label_settings(datasets.Dataset.from_dict({"label": [0, 2, 1, 2]})) == {"num_labels": 3}


# ---- environment ----


def test_offline_detection_follows_overrides(tmp_path):
    config = tmp_path / "config.yaml"
    config.write_text("model_name_or_path: all-minilm-l6-v2\ndataset_name: rotten-tomatoes\n")
    assert uses_only_offline_assets([str(config)])
    assert not uses_only_offline_assets([str(config), "--model_name_or_path", "bert-base-uncased"])
    assert not uses_only_offline_assets([str(config), "--dataset_name=imdb"])
    assert not uses_only_offline_assets([str(tmp_path / "absent.yaml")])


def test_configure_environment_sets_offline_defaults(tmp_path, monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HOME"):
        monkeypatch.delenv(name, raising=False)
    config = tmp_path / "config.yaml"
    config.write_text("model_name_or_path: smollm2-135m-instruct\ndataset_name: rotten-tomatoes\n")
    assert configure_environment([str(config)], hf_home=tmp_path / "hf")
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_DATASETS_OFFLINE"] == "1"
    assert os.environ["HF_HOME"] == str(tmp_path / "hf")


def test_configure_environment_leaves_hub_runs_online(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    config = tmp_path / "config.yaml"
    config.write_text("model_name_or_path: facebook/deit-small-patch16-224\ndataset_name: uoft-cs/cifar10\n")
    assert not configure_environment([str(config)], hf_home=tmp_path / "hf")
    assert "HF_HUB_OFFLINE" not in os.environ


# ---- trainable parameters ----


def tiny_bert() -> BertForSequenceClassification:
    torch.manual_seed(0)
    config = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16, num_labels=2)
    return BertForSequenceClassification(config).eval()


def trainable_names(model) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def test_head_finetuning_trains_only_named_modules():
    model = prepare_trainable_model(
        tiny_bert(), ModelArguments("m", finetuning="head"), LoraArguments(), default_trainable_modules=["classifier"]
    )
    assert trainable_names(model) == ["classifier.weight", "classifier.bias"]
    assert model.training


def test_lora_options_without_lora_warn(caplog):
    with caplog.at_level("WARNING", logger="hf_dp_microadam.recipes.modeling"):
        prepare_trainable_model(tiny_bert(), ModelArguments("m", finetuning="head"), LoraArguments(lora_r=4),
                                default_trainable_modules=["classifier"])

    assert "finetuning='head' trains no LoRA adapters, so lora_r=4 has no effect" in caplog.text


def test_default_lora_options_do_not_warn(caplog):
    with caplog.at_level("WARNING", logger="hf_dp_microadam.recipes.modeling"):
        prepare_trainable_model(tiny_bert(), ModelArguments("m", finetuning="full"), LoraArguments())

    assert "LoRA" not in caplog.text


def test_lora_finetuning_adds_adapters_and_head():
    model = prepare_trainable_model(
        tiny_bert(), ModelArguments("m", finetuning="lora", trainable_modules=["classifier", "pooler"]),
        LoraArguments(lora_r=2, lora_target_modules=["query", "value"]), peft_task_type="SEQ_CLS",
    )
    names = trainable_names(model)
    assert any("lora_A" in name and "query" in name for name in names)
    assert any("lora_B" in name and "value" in name for name in names)
    assert any("classifier" in name for name in names)
    assert any("pooler" in name for name in names)
    assert not any("word_embeddings" in name for name in names)
    assert all(module.training for module in model.modules())


def test_full_finetuning_freezes_unused_parameters():
    model = prepare_trainable_model(
        tiny_bert(), ModelArguments("m", finetuning="full"), LoraArguments(),
        unused_parameters=["pooler.dense.bias"],
    )
    names = trainable_names(model)
    assert "bert.pooler.dense.bias" not in names
    assert "bert.pooler.dense.weight" in names
    assert len(names) == len(list(model.parameters())) - 1


def test_unknown_trainable_module_is_an_error():
    with pytest.raises(ValueError, match="match no module"):
        prepare_trainable_model(
            tiny_bert(), ModelArguments("m", finetuning="head", trainable_modules=["score"]), LoraArguments()
        )


def test_head_finetuning_needs_modules():
    with pytest.raises(ValueError, match="needs trainable_modules"):
        prepare_trainable_model(tiny_bert(), ModelArguments("m", finetuning="head"), LoraArguments())


@pytest.mark.parametrize("error", [
    ConfigError("lora_r must be at least 1"),
    DPSettingsChangedError("the checkpoint's privacy state comes from a run with other DP settings"),
])
def test_recipe_main_fixable_error_exits(error, capsys):
    def main():
        raise error

    with pytest.raises(SystemExit) as exited:
        run.run_recipe_main(main)

    assert exited.value.code == 2
    printed = capsys.readouterr().err
    assert printed.startswith(f"error: {error}")
    assert "Traceback" not in printed


def test_recipe_main_raises_other_errors():
    def main():
        raise RuntimeError("a bug")

    with pytest.raises(RuntimeError, match="a bug"):
        run.run_recipe_main(main)
