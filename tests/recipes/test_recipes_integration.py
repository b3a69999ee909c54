"""The three recipes, run as a user runs them on their default CPU configs, cut to a few steps.

Each recipe runs once per module in a subprocess on the real offline model and data
(install them with `make assets`), and the tests then check every file it wrote. The
image recipe runs through `accelerate launch` with the single-process CPU config, and one
text run uses the two-process CPU config.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch
from safetensors.torch import load_file

from recipe_scripts import CONFIGS_DIR, RECIPES_DIR, REPO_ROOT

pytestmark = pytest.mark.integration

STEPS = 2
# Sizes that keep the three runs together within a few minutes on two CPU cores.
SHORT_RUN = [
    "--max_steps", str(STEPS),
    "--logical_batch_size", "32",
    "--per_device_train_batch_size", "16",
    "--max_train_samples", "256",
    "--max_eval_samples", "16",
    "--max_test_samples", "32",
    "--eval_steps", "1",
    "--save_steps", "1",
    "--logging_steps", "1",
]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def run_recipe(command: list[str], output_dir: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(command, cwd=REPO_ROOT, env=dict(os.environ), capture_output=True, text=True,
                            timeout=900)
    if result.returncode != 0:
        pytest.fail(f"{' '.join(command)} exited with {result.returncode}:\n{result.stdout[-4000:]}\n"
                    f"{result.stderr[-6000:]}")
    assert output_dir.is_dir(), f"no output folder {output_dir}"
    return result


def recipe_command(recipe: str, config: str, output_dir: Path, *extra: str) -> list[str]:
    return [sys.executable, str(RECIPES_DIR / f"{recipe}.py"), str(CONFIGS_DIR / config),
            "--output_dir", str(output_dir), *SHORT_RUN, *extra]


def accelerate_command(recipe: str, config: str, output_dir: Path, *extra: str,
                       accelerate_config: str = "cpu.yaml") -> list[str]:
    launcher = Path(sys.executable).with_name("accelerate")
    prefix = [str(launcher)] if launcher.exists() else [sys.executable, "-m", "accelerate.commands.launch"]
    if launcher.exists():
        prefix.append("launch")
    return [*prefix, "--config_file", str(CONFIGS_DIR / "accelerate" / accelerate_config),
            str(RECIPES_DIR / f"{recipe}.py"), str(CONFIGS_DIR / config),
            "--output_dir", str(output_dir), *SHORT_RUN, *extra]


def read_json(path: Path) -> dict:
    assert path.is_file(), f"missing {path.name}"
    return json.loads(path.read_text())


def check_privacy_files(output_dir: Path) -> dict:
    metrics = read_json(output_dir / "metrics.json")
    report = read_json(output_dir / "privacy_report.json")
    assert report["steps"] == STEPS
    assert report["target_epsilon"] == 8
    assert 0 < report["epsilon"] <= 8
    assert report["disabled"] is False
    assert report["max_grad_norm"] == 1.0
    assert report["expected_batch_size"] == 32
    assert metrics["epsilon"] == pytest.approx(report["epsilon"])
    assert metrics["delta"] == pytest.approx(report["delta"])
    assert metrics["steps"] == STEPS
    assert metrics["noise_multiplier"] > 0
    options = read_json(output_dir / "recipe_options.json")
    assert options["target_epsilon"] == 8
    assert options["output_dir"] == str(output_dir)
    return metrics


def check_plot(output_dir: Path) -> None:
    plot = output_dir / "training_curves.png"
    assert plot.is_file(), "missing training_curves.png"
    data = plot.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000


def check_log_history(output_dir: Path, metric: str | None) -> None:
    history = read_json(output_dir / "trainer_state.json")["log_history"]
    assert [entry["epsilon"] for entry in history if "epsilon" in entry], "no epsilon logged"
    assert all("grad_norm" not in entry for entry in history)
    if metric is not None:
        assert any(metric in entry for entry in history), f"no {metric} logged"


# ---- text classification: plain python ----


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("text") / "run"
    result = run_recipe(recipe_command("text_classification", "text_classification/cpu.yaml", output_dir), output_dir)
    return output_dir, result


def test_text_recipe_metrics(text_run):
    output_dir, result = text_run
    metrics = check_privacy_files(output_dir)
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["test_examples"] == 32
    assert metrics["train_examples"] == 256
    assert metrics["finetuning"] == "lora"
    assert "test_accuracy" in result.stdout
    assert "epsilon" in result.stdout


def test_text_recipe_plot_and_logs(text_run):
    output_dir, _ = text_run
    check_plot(output_dir)
    check_log_history(output_dir, "eval_accuracy")


def test_text_recipe_adapter_reloads(text_run):
    from peft import PeftModel

    from hf_dp_microadam.assets import load_model

    output_dir, _ = text_run
    saved = load_file(output_dir / "adapter_model.safetensors")
    metrics = json.loads((output_dir / "metrics.json").read_text())
    assert metrics["classifier_pooling"] == "mean"
    base, _ = load_model("all-minilm-l6-v2", "sequence-classification", num_labels=2, classifier_pooling="mean")
    model = PeftModel.from_pretrained(base, output_dir)
    parameters = dict(model.named_parameters())
    lora_b = [name for name in parameters if "lora_B" in name]
    assert lora_b, "no LoRA weights in the reloaded model"
    assert any(parameters[name].abs().sum() > 0 for name in lora_b), "LoRA B matrices are still zero"
    head = [key for key in saved if "classifier" in key]
    assert head, "the classification head was not saved with the adapter"
    # PEFT saves the trained head copy `classifier.modules_to_save.default.bias` under the
    # name `classifier.bias`, and `lora_B.default.weight` under `lora_B.weight`.
    def saved_name(name: str) -> str:
        return name.replace(".modules_to_save.default", "").replace(".default", "")

    for key, value in saved.items():
        matches = [name for name in parameters if saved_name(name) == key]
        assert matches, f"saved tensor {key} is not in the reloaded model"
        assert torch.equal(parameters[matches[0]].detach(), value), key


def test_text_recipe_rerun_reports_finished_run(text_run):
    output_dir, _ = text_run
    command = recipe_command("text_classification", "text_classification/cpu.yaml", output_dir)
    result = run_recipe(command, output_dir)
    assert "already finished" in result.stdout
    assert "test_accuracy" in result.stdout


@pytest.mark.multiprocess
def test_text_recipe_on_two_cpu_processes(tmp_path):
    output_dir = tmp_path / "run"
    command = accelerate_command("text_classification", "text_classification/cpu.yaml", output_dir,
                                 accelerate_config="multi_cpu.yaml")
    result = run_recipe(command, output_dir)

    assert "test_accuracy" in result.stdout
    check_privacy_files(output_dir)
    check_plot(output_dir)


# ---- image classification: accelerate launch ----


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("image") / "run"
    if shutil.which("accelerate") is None and not Path(sys.executable).with_name("accelerate").exists():
        pytest.fail("the accelerate command is not installed")
    command = accelerate_command(
        "image_classification", "image_classification/cpu.yaml", output_dir,
    )
    return output_dir, run_recipe(command, output_dir)


def test_image_recipe_metrics(image_run):
    output_dir, _ = image_run
    metrics = check_privacy_files(output_dir)
    assert 0 <= metrics["test_accuracy"] <= 1
    assert metrics["finetuning"] == "head"
    assert metrics["image_size"] == 56
    assert metrics["trainable_parameters"] == 768 * 10 + 10


def test_image_recipe_plot_and_logs(image_run):
    output_dir, _ = image_run
    check_plot(output_dir)
    check_log_history(output_dir, "eval_accuracy")


def test_image_recipe_model_reloads(image_run):
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    output_dir, _ = image_run
    model = AutoModelForImageClassification.from_pretrained(output_dir)
    processor = AutoImageProcessor.from_pretrained(output_dir)
    saved = load_file(output_dir / "model.safetensors")
    assert torch.equal(model.classifier.weight.detach(), saved["classifier.weight"])
    assert model.config.num_labels == 10
    assert model.config.id2label[0] == "T-shirt/top"
    image = PIL.Image.new("L", (28, 28))
    pixel_values = processor([image], return_tensors="pt")["pixel_values"]
    assert pixel_values.shape == (1, 3, 56, 56)
    with torch.no_grad():
        assert model(pixel_values=pixel_values).logits.shape == (1, 10)


# ---- causal LM LoRA ----


@pytest.fixture(scope="module")
def causal_lm_run(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("causal_lm") / "run"
    command = recipe_command(
        "causal_lm_lora", "causal_lm/cpu.yaml", output_dir,
        "--max_seq_length", "32", "--generation_max_new_tokens", "4", "--per_device_eval_batch_size", "16",
    )
    return output_dir, run_recipe(command, output_dir)


def test_causal_lm_recipe_metrics(causal_lm_run):
    output_dir, result = causal_lm_run
    metrics = check_privacy_files(output_dir)
    for key in ("perplexity_before", "perplexity_after", "test_loss_before", "test_loss_after"):
        assert math.isfinite(metrics[key]), key
        assert metrics[key] > 0, key
    assert metrics["perplexity_before"] == pytest.approx(math.exp(metrics["test_loss_before"]))
    assert metrics["test_tokens"] > 32
    assert "perplexity_after" in result.stdout


def test_causal_lm_recipe_generations(causal_lm_run):
    output_dir, result = causal_lm_run
    generations = read_json(output_dir / "generations.json")["generations"]
    assert [entry["prompt"] for entry in generations] == ["The movie", "I expected"]
    assert all(entry["before"] and entry["after"] for entry in generations)
    assert "Generations" in result.stdout


def test_causal_lm_recipe_plot_and_logs(causal_lm_run):
    output_dir, _ = causal_lm_run
    check_plot(output_dir)
    check_log_history(output_dir, "eval_loss")


def test_causal_lm_recipe_adapter_reloads(causal_lm_run):
    from peft import PeftModel

    from hf_dp_microadam.assets import load_model

    output_dir, _ = causal_lm_run
    saved = load_file(output_dir / "adapter_model.safetensors")
    base, tokenizer = load_model("smollm2-135m-instruct", "causal-lm")
    model = PeftModel.from_pretrained(base, output_dir)
    parameters = {name.replace(".default", ""): p for name, p in model.named_parameters()}
    assert len(saved) == 4 * 30, "expected LoRA A and B for q_proj and v_proj in 30 layers"
    for key, value in saved.items():
        assert torch.equal(parameters[key].detach(), value), key
    assert any(value.abs().sum() > 0 for key, value in saved.items() if "lora_B" in key)
    inputs = tokenizer("The movie", return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 2
