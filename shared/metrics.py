"""Binary outcome metrics, all from scikit-learn (threshold 0.5 for the thresholded ones)."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import accuracy_score, brier_score_loss, confusion_matrix, f1_score, log_loss, roc_auc_score

THRESHOLD = 0.5


def binary_metrics(y_true: np.ndarray, y_score: np.ndarray) -> dict[str, float]:
    y_true = np.asarray(y_true).astype(int)
    y_score = np.asarray(y_score, dtype=float)
    y_pred = (y_score >= THRESHOLD).astype(int)
    tn, fp, fn, tp = confusion_matrix(y_true, y_pred, labels=[0, 1]).ravel()
    both_classes = len(np.unique(y_true)) == 2
    return {
        "auroc": float(roc_auc_score(y_true, y_score)) if both_classes else float("nan"),
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "sensitivity": float(tp / (tp + fn)) if tp + fn else float("nan"),
        "specificity": float(tn / (tn + fp)) if tn + fp else float("nan"),
        "f1": float(f1_score(y_true, y_pred, zero_division=0.0)),
        "brier": float(brier_score_loss(y_true, y_score, pos_label=1)),
        "log_loss": float(log_loss(y_true, np.clip(y_score, 1e-7, 1 - 1e-7), labels=[0, 1])),
        "n": int(len(y_true)),
        "prevalence": float(y_true.mean()) if len(y_true) else float("nan"),
    }
