"""logistic.py: the library's logistic regression."""

import numpy as np
import pytest

from lungseg.logistic import LogisticRegression


def test_fit_recovers_the_direction_and_round_trips():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2000, 2)) * [1.0, 10.0] + [0.0, 50.0]
    logit = 2.0 * x[:, 0] - 0.1 * (x[:, 1] - 50.0)
    y = (rng.random(2000) < 1 / (1 + np.exp(-logit))).astype(int)
    model = LogisticRegression.fit(x, y, features=("a", "b"))
    # Standardised weights: 2 x sd 1 and -0.1 x sd 10.
    assert model.weights == pytest.approx([2.0, -1.0], abs=0.25)
    p = model(x)
    assert p.dtype == np.float32 and np.all((p > 0) & (p < 1))
    again = LogisticRegression.from_dict(model.to_dict(), ("a", "b"))
    assert np.allclose(again(x), p)
    assert np.allclose(model.decision(x), np.log(p / (1 - p)), atol=1e-4)


def test_refuses_one_class_and_other_features():
    x = np.zeros((5, 1))
    with pytest.raises(ValueError, match="both classes"):
        LogisticRegression.fit(x, np.ones(5))
    model = LogisticRegression.fit(np.arange(6.0)[:, None], [0, 0, 1, 0, 1, 1], features=("a",))
    with pytest.raises(ValueError, match="features"):
        LogisticRegression.from_dict(model.to_dict(), ("b",))
    with pytest.raises(ValueError, match="expected"):
        LogisticRegression.fit(np.zeros((4, 2)), [0, 1, 0, 1], features=("a",))
