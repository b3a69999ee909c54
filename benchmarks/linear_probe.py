#!/usr/bin/env python
"""Non-private linear-probe reference for the DP recipes on the offline assets.

For each (encoder, dataset) pair the encoder stays frozen: its features feed an L2-
regularized logistic regression (scikit-learn, features standardized on train). The
inverse regularization strength C is chosen on the validation split, and the model
trained on train with that C is scored on test. The majority-class baseline predicts
the most frequent train label.

- MiniLM on Rotten Tomatoes: all-MiniLM-L6-v2, mean of the last hidden states over
  the non-padding tokens (at most 128 tokens), all splits.
- DINOv2 on Fashion-MNIST: the CLS token of the last layer of the DINOv2-small
  backbone, images resized to --image-size (default 112 px, 8x8 patches). By default a
  random subset of 10,000 train, 2,000 validation and 5,000 test images (drawn with the
  loader's split seed). Feature extraction ran at 12 to 33 images/s on two shared CPU
  cores (AMD EPYC, torch 2.13), so all 70,000 would take an estimated 35 to 100 minutes.

Prints a table and writes JSON with the accuracies, the settings, the wall time and the
machine to benchmarks/results/linear_probe.json.

    python benchmarks/linear_probe.py
    python benchmarks/linear_probe.py --probes dinov2-fashion-mnist --fmnist-train 0
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hf_dp_microadam.assets import load_dataset_dict, load_model  # noqa: E402

RESULTS_PATH = Path(__file__).resolve().parent / "results" / "linear_probe.json"
C_GRID = (0.01, 0.1, 1.0, 10.0)
TEXT_MAX_LENGTH = 128


def mean_pooled_text_features(model, tokenizer, texts: list[str], batch_size: int) -> np.ndarray:
    """Return sentence embeddings: the masked mean of the last hidden states."""
    # Batching texts of similar length wastes little compute on padding.
    order = np.argsort([len(text) for text in texts], kind="stable")
    features = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            batch = tokenizer(
                [texts[row] for row in rows],
                padding=True,
                truncation=True,
                max_length=TEXT_MAX_LENGTH,
                return_tensors="pt",
            )
            hidden = model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            features[rows] = ((hidden * mask).sum(1) / mask.sum(1)).numpy()
    return features


def cls_image_features(model, processor, images: list, batch_size: int) -> np.ndarray:
    """Return the last-layer CLS token of a ViT backbone for each image."""
    features = np.zeros((len(images), model.config.hidden_size), dtype=np.float32)
    with torch.inference_mode():
        for start in range(0, len(images), batch_size):
            pixel_values = processor(images[start : start + batch_size], return_tensors="pt")["pixel_values"]
            features[start : start + batch_size] = model(pixel_values=pixel_values).last_hidden_state[:, 0].numpy()
    return features


def fit_probe(features: dict[str, np.ndarray], labels: dict[str, np.ndarray]) -> dict:
    """Fit the logistic regression for each C, pick C on validation, score on test."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(features["train"])
    scaled = {split: scaler.transform(values) for split, values in features.items()}
    validation_accuracy = {}
    models = {}
    for c in C_GRID:
        classifier = LogisticRegression(C=c, max_iter=3000)
        classifier.fit(scaled["train"], labels["train"])
        models[c] = classifier
        validation_accuracy[c] = float(classifier.score(scaled["validation"], labels["validation"]))
    best_c = max(C_GRID, key=lambda c: validation_accuracy[c])

    majority_label = int(np.bincount(labels["train"]).argmax())
    return {
        "test_accuracy": float(models[best_c].score(scaled["test"], labels["test"])),
        "validation_accuracy": validation_accuracy[best_c],
        "best_C": best_c,
        "validation_accuracy_per_C": {str(c): accuracy for c, accuracy in validation_accuracy.items()},
        "majority_test_accuracy": float(np.mean(labels["test"] == majority_label)),
    }


def probe_minilm_rotten_tomatoes(args) -> dict:
    splits = load_dataset_dict("rotten-tomatoes")
    model, tokenizer = load_model("all-minilm-l6-v2", "feature-extraction")
    model.eval()
    start = time.perf_counter()
    features = {
        split: mean_pooled_text_features(model, tokenizer, list(dataset["text"]), args.batch_size)
        for split, dataset in splits.items()
    }
    feature_seconds = time.perf_counter() - start
    labels = {split: np.asarray(dataset["label"]) for split, dataset in splits.items()}
    result = fit_probe(features, labels)
    result.update(
        encoder="all-minilm-l6-v2",
        dataset="rotten-tomatoes",
        features=f"mean-pooled last hidden state, max {TEXT_MAX_LENGTH} tokens",
        rows=splits.num_rows,
        feature_seconds=round(feature_seconds, 1),
    )
    return result


def probe_dinov2_fashion_mnist(args) -> dict:
    limits = {
        "train": args.fmnist_train or None,
        "validation": args.fmnist_validation or None,
        "test": args.fmnist_test or None,
    }
    splits = load_dataset_dict("fashion-mnist", max_samples_per_split=limits)
    model, processor = load_model(
        "dinov2-small-imgfocus",
        "feature-extraction",
        processor_kwargs={
            "size": {"shortest_edge": args.image_size},
            "crop_size": {"height": args.image_size, "width": args.image_size},
        },
    )
    model.eval()
    start = time.perf_counter()
    features = {
        split: cls_image_features(model, processor, list(dataset["image"]), args.batch_size)
        for split, dataset in splits.items()
    }
    feature_seconds = time.perf_counter() - start
    labels = {split: np.asarray(dataset["label"]) for split, dataset in splits.items()}
    result = fit_probe(features, labels)
    result.update(
        encoder="dinov2-small-imgfocus",
        dataset="fashion-mnist",
        features=f"CLS token of the last layer at {args.image_size} px",
        rows=splits.num_rows,
        feature_seconds=round(feature_seconds, 1),
    )
    return result


PROBES = {
    "minilm-rotten-tomatoes": probe_minilm_rotten_tomatoes,
    "dinov2-fashion-mnist": probe_dinov2_fashion_mnist,
}


def describe_machine() -> dict:
    import sklearn
    import transformers

    cpu_model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu_model,
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "scikit-learn": sklearn.__version__,
    }


def print_table(results: list[dict]) -> None:
    header = f"{'encoder':<24} {'dataset':<16} {'train/val/test rows':<22} {'C':>5} {'val':>6} {'test':>6} {'majority':>9}"
    print(header)
    print("-" * len(header))
    for result in results:
        rows = "/".join(str(result["rows"][split]) for split in ("train", "validation", "test"))
        print(
            f"{result['encoder']:<24} {result['dataset']:<16} {rows:<22} {result['best_C']:>5g} "
            f"{result['validation_accuracy']:>6.3f} {result['test_accuracy']:>6.3f} "
            f"{result['majority_test_accuracy']:>9.3f}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Linear probes on frozen offline encoders (no privacy).")
    parser.add_argument("--probes", nargs="+", choices=list(PROBES), default=list(PROBES), help="probes to run")
    parser.add_argument("--image-size", type=int, default=112, help="DINOv2 input side in pixels (multiple of 14)")
    parser.add_argument("--fmnist-train", type=int, default=10_000, help="Fashion-MNIST train rows; 0 for all 54,000")
    parser.add_argument("--fmnist-validation", type=int, default=2_000, help="validation rows; 0 for all 6,000")
    parser.add_argument("--fmnist-test", type=int, default=5_000, help="test rows; 0 for all 10,000")
    parser.add_argument("--batch-size", type=int, default=64, help="encoder batch size")
    parser.add_argument("--num-threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON file to write")
    args = parser.parse_args(argv)
    if args.image_size % 14:
        parser.error(f"--image-size must be a multiple of the 14 px patch size, got {args.image_size}")
    if args.num_threads:
        torch.set_num_threads(args.num_threads)

    started = time.perf_counter()
    results = []
    for name in args.probes:
        probe_started = time.perf_counter()
        result = PROBES[name](args)
        result["wall_seconds"] = round(time.perf_counter() - probe_started, 1)
        results.append(result)
        print(f"{name}: test accuracy {result['test_accuracy']:.3f} in {result['wall_seconds']} s", flush=True)
    wall_seconds = time.perf_counter() - started

    print()
    print_table(results)
    print(f"\nwall time {wall_seconds:.0f} s")
    report = {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name, *(argv if argv is not None else sys.argv[1:])]),
        "wall_seconds": round(wall_seconds, 1),
        "machine": describe_machine(),
        "c_grid": list(C_GRID),
        "results": results,
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
