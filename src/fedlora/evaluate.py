"""Score a finished run's classifier on a labelled file: `fedlora evaluate RUN --data FILE`.

With C the confusion matrix (C[i, j] = texts of true class i predicted as j), n texts:

    accuracy     = Σ_k C[k, k] / n
    precision_k  = C[k, k] / Σ_i C[i, k]     recall_k = C[k, k] / Σ_j C[k, j]
    F1_k         = 2·precision_k·recall_k / (precision_k + recall_k)

(0 where a denominator is 0, as scikit-learn's `zero_division=0`), and calibration: the texts
are binned by confidence c = max_k p_k into 10 equal-width bins on [0, 1], and

    ECE = Σ_b (n_b / n)·|accuracy_b − mean confidence_b|.

The folder written holds metrics.json, per_class.csv, confusion.csv and confusion.png,
calibration.csv and reliability.png (accuracy against confidence per bin), predictions.csv.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np

from fedlora.data.sources import load_labelled
from fedlora.errors import ConfigError, DataError
from fedlora.fsutil import whole_folder
from fedlora.predict import class_probabilities, csv_bytes as _csv, load_trained, predictions_csv

BINS = 10


def confusion(truth: np.ndarray, predicted: np.ndarray, classes: int) -> np.ndarray:
    out = np.zeros((classes, classes), dtype=np.int64)
    np.add.at(out, (truth, predicted), 1)
    return out


def per_class(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """precision, recall, F1 and support (true count) of each class, from the confusion matrix."""
    hits = np.diag(matrix).astype(float)
    predicted, actual = matrix.sum(axis=0), matrix.sum(axis=1)
    precision = np.divide(hits, predicted, out=np.zeros_like(hits), where=predicted > 0)
    recall = np.divide(hits, actual, out=np.zeros_like(hits), where=actual > 0)
    both = precision + recall
    f1 = np.divide(2 * precision * recall, both, out=np.zeros_like(hits), where=both > 0)
    return {"precision": precision, "recall": recall, "f1": f1, "support": actual}


def calibration(probabilities: np.ndarray, truth: np.ndarray, bins: int = BINS) -> list[dict]:
    """Per confidence bin [b/bins, (b+1)/bins) (the last one closed): its count, accuracy and
    mean confidence (None when empty)."""
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == truth
    index = np.minimum((confidence * bins).astype(int), bins - 1)
    rows = []
    for b in range(bins):
        inside = index == b
        n = int(inside.sum())
        rows.append({"bin": f"{b / bins:.1f}-{(b + 1) / bins:.1f}", "count": n,
                     "accuracy": float(correct[inside].mean()) if n else None,
                     "confidence": float(confidence[inside].mean()) if n else None})
    return rows


def expected_calibration_error(rows: list[dict]) -> float:
    n = sum(r["count"] for r in rows)
    return sum(r["count"] / n * abs(r["accuracy"] - r["confidence"]) for r in rows if r["count"])


def evaluate_file(run: str | Path, data: str | Path, out: str | Path | None = None,
                  text_column: str = "text", label_column: str = "label",
                  client: int | None = None, device: str = "auto", batch_size: int = 64,
                  progress: bool = False) -> dict:
    """Score `run`'s model on `data` and write the folder `out` (default
    RUN/evaluation-<file stem>); returns metrics.json's content and the folder's path
    ("folder"). The folder appears whole or
    not at all; an existing one is never replaced."""
    target = Path(out) if out else Path(run) / f"evaluation-{Path(data).name.split('.')[0]}"
    if target.exists():
        raise ConfigError(f"--out '{target}' exists — choose another folder, or delete it first")
    if not target.parent.is_dir():
        raise ConfigError(f"--out '{target}': folder '{target.parent}' does not exist — create it first")
    texts, labels = load_labelled(data, text_column, label_column)
    clf = load_trained(run, client, device)
    unknown = sorted(set(labels) - set(clf.label_names))
    if unknown:
        raise DataError(f"--label-column: '{data}' has labels the run never saw: "
                        f"{', '.join(map(repr, unknown))} — the run's classes are "
                        f"{', '.join(map(repr, clf.label_names))}; relabel or remove those rows")
    index = {name: k for k, name in enumerate(clf.label_names)}
    truth = np.array([index[y] for y in labels])
    probabilities = class_probabilities(clf, texts, batch_size, progress).numpy()
    if not np.isfinite(probabilities).all():
        raise DataError("the model gave non-finite scores — the run's adapter is damaged; "
                        "nothing was written")
    metrics, files = _report(probabilities, truth, clf.label_names, run, data)
    with whole_folder(target) as partial:
        for name, content in files.items():
            (partial / name).write_bytes(content)
        (partial / "predictions.csv").write_bytes(predictions_csv(_tensor(probabilities), clf.label_names))
    return {**metrics, "folder": str(target)}


def _tensor(array: np.ndarray):
    import torch

    return torch.from_numpy(array)


def _report(probabilities: np.ndarray, truth: np.ndarray, names: list[str], run, data) -> tuple[dict, dict]:
    predicted = probabilities.argmax(axis=1)
    matrix = confusion(truth, predicted, len(names))
    classes = per_class(matrix)
    bins = calibration(probabilities, truth)
    metrics = {
        "run": str(run), "data": str(data), "texts": int(len(truth)),
        "accuracy": float((predicted == truth).mean()),
        "macro_f1": float(classes["f1"].mean()),
        "expected_calibration_error": expected_calibration_error(bins),
        "per_class": {n: {k: float(v[i]) for k, v in classes.items()} for i, n in enumerate(names)},
    }
    files = {
        "metrics.json": (json.dumps(metrics, indent=2) + "\n").encode(),
        "per_class.csv": _csv(["class", "precision", "recall", "f1", "support"],
                              [[n, *(f"{classes[k][i]:.6f}" for k in ("precision", "recall", "f1")),
                                int(classes["support"][i])] for i, n in enumerate(names)]),
        "confusion.csv": _csv(["true \\ predicted", *names],
                              [[n, *map(int, matrix[i])] for i, n in enumerate(names)]),
        "calibration.csv": _csv(["bin", "count", "accuracy", "confidence"],
                                [[r["bin"], r["count"], _num(r["accuracy"]), _num(r["confidence"])]
                                 for r in bins]),
        "confusion.png": _confusion_png(matrix, names),
        "reliability.png": _reliability_png(bins, metrics["expected_calibration_error"]),
    }
    return metrics, files


def _num(x: float | None) -> str:
    return "" if x is None else f"{x:.6f}"


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=120, bbox_inches="tight")
    return buffer.getvalue()


def _confusion_png(matrix: np.ndarray, names: list[str]) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(1.2 + 0.8 * len(names), 1.0 + 0.8 * len(names)))
    ax = fig.subplots()
    ax.imshow(matrix, cmap="Blues")
    for (i, j), count in np.ndenumerate(matrix):
        ax.text(j, i, str(count), ha="center", va="center",
                color="white" if count > matrix.max() / 2 else "black")
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    return _png(fig)


def _reliability_png(bins: list[dict], ece: float) -> bytes:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.5, 4.5))
    ax = fig.subplots()
    centres = [(i + 0.5) / len(bins) for i in range(len(bins))]
    ax.bar(centres, [r["accuracy"] or 0.0 for r in bins], width=1 / len(bins), edgecolor="black",
           alpha=0.7, label="accuracy")
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    ax.set_xlabel("confidence (max class probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability (ECE = {ece:.3f})")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return _png(fig)
