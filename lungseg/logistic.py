"""Logistic regression on a few named features: the library's one implementation.

Used where a probability is refitted from a network's score and measured
features: the detector's p(nodule) (:class:`lungseg.detect.Rescorer`) and
the malignancy classifier's hybrid (:mod:`lungseg.malignancy`). Features are
standardised with the training mean and standard deviation; the weights
(not the bias) carry an L2 penalty ``l2 / n``; fitted by L-BFGS on the mean
log-loss. Stored as plain data (``to_dict``), so checkpoints that hold one
still load with ``weights_only=True``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np


@dataclass
class LogisticRegression:
    """p = sigmoid(((x - mean) / std) . weights + bias) over the columns ``features`` names."""

    features: tuple[str, ...]
    mean: np.ndarray
    std: np.ndarray
    weights: np.ndarray
    bias: float
    default_l2: ClassVar[float] = 1.0

    @classmethod
    def fit(cls, x: np.ndarray, y: np.ndarray, l2: float | None = None, *,
            features: Sequence[str] | None = None) -> "LogisticRegression":
        from scipy.optimize import minimize

        x = np.asarray(x, np.float64)
        names = tuple(features) if features is not None else tuple(getattr(cls, "FEATURES", ()))
        if x.ndim != 2 or (names and x.shape[1] != len(names)):
            raise ValueError(f"expected (n, {len(names) or 'k'}) features, got shape {x.shape}")
        if len(set(np.asarray(y).tolist())) < 2:
            raise ValueError("logistic regression needs both classes among its training rows")
        l2 = cls.default_l2 if l2 is None else l2
        mean, std = x.mean(axis=0), x.std(axis=0) + 1e-9
        z = (x - mean) / std
        y = np.asarray(y, np.float64)

        def loss(w):
            t = z @ w[:-1] + w[-1]
            grad_t = (1 / (1 + np.exp(-t)) - y) / len(y)
            value = np.mean(np.logaddexp(0, t) - y * t) + 0.5 * l2 / len(y) * np.sum(w[:-1] ** 2)
            grad = np.r_[z.T @ grad_t + l2 / len(y) * w[:-1], grad_t.sum()]
            return value, grad

        w = minimize(loss, np.zeros(x.shape[1] + 1), jac=True, method="L-BFGS-B").x
        return cls(names or tuple(f"x{i}" for i in range(x.shape[1])), mean, std, w[:-1], float(w[-1]))

    def decision(self, x: np.ndarray) -> np.ndarray:
        """The log-odds of each row."""
        return ((np.asarray(x, np.float64) - self.mean) / self.std) @ self.weights + self.bias

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (1 / (1 + np.exp(-self.decision(x)))).astype(np.float32)

    def to_dict(self) -> dict:
        return {"features": list(self.features), "mean": self.mean.tolist(), "std": self.std.tolist(),
                "weights": self.weights.tolist(), "bias": self.bias}

    @classmethod
    def from_dict(cls, d: dict, features: Sequence[str] | None = None) -> "LogisticRegression":
        """Rebuild one; ``features`` (default: the class's ``FEATURES``) must match those it was fitted on."""
        expected = tuple(features) if features is not None else tuple(getattr(cls, "FEATURES", ()))
        if expected and tuple(d.get("features", ())) != expected:
            raise ValueError(f"features {d.get('features')} are not this lungseg's {expected}")
        return cls(tuple(d["features"]), np.asarray(d["mean"], float), np.asarray(d["std"], float),
                   np.asarray(d["weights"], float), float(d["bias"]))


__all__ = ["LogisticRegression"]
