"""Fast re-implementations agree with the references they replace."""

from __future__ import annotations

import numpy as np
import pytest
from opacus.accountants.analysis import rdp as opacus_rdp
from sklearn import metrics as skm

from fedcare.client.privacy import (ALPHAS, _INTEGER_ORDERS, _rdp_integer_orders, calibrate_noise, epsilon,
                                    rdp_per_step)
from fedcare.shared.metrics import binary_metrics


def test_binary_metrics_equal_scikit_learn():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 60))
        y = rng.integers(0, 2, n)
        p = np.round(rng.random(n), 1)  # ties on purpose
        pred = (p >= 0.5).astype(int)
        ours = binary_metrics(p, y)
        ref = {"accuracy": skm.accuracy_score(y, pred),
               "precision": skm.precision_score(y, pred, zero_division=0),
               "recall": skm.recall_score(y, pred, zero_division=0),
               "f1": skm.f1_score(y, pred, zero_division=0),
               "roc_auc": skm.roc_auc_score(y, p) if len(set(y)) == 2 else float("nan")}
        for k, v in ref.items():
            assert np.isclose(ours[k], v, equal_nan=True), (k, ours[k], v)


@pytest.mark.parametrize("sigma,q", [(3.0, 0.1), (1.2, 0.05), (10.0, 0.5), (0.8, 0.01), (2.0, 1.0)])
def test_integer_order_rdp_equals_opacus(sigma, q):
    ref = np.array(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=list(_INTEGER_ORDERS)))
    assert np.allclose(_rdp_integer_orders(sigma, q), ref, rtol=1e-10, atol=0)


@pytest.mark.parametrize("sigma", [0.3, 0.8, 1.0, 3.0, 50.0])
@pytest.mark.parametrize("q", [1e-4, 0.01, 0.16, 0.5, 0.99, 1.0])
def test_rdp_and_epsilon_equal_opacus_at_every_order(sigma, q):
    ref = np.array(opacus_rdp.compute_rdp(q=q, noise_multiplier=sigma, steps=1, orders=ALPHAS))
    ours = rdp_per_step(sigma, q)
    assert np.allclose(ours, ref, rtol=1e-6, atol=1e-11)
    for steps in (1, 300, 20000):
        want = opacus_rdp.get_privacy_spent(orders=ALPHAS, rdp=ref * steps, delta=1e-5)[0]
        assert epsilon([(sigma, q, steps)], 1e-5) == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("q,steps,target", [(1 / 7, 35, 1.0), (0.5, 10, 1.0), (1.0, 5, 1.0), (1 / 13, 260, 3.0)])
def test_calibration_lands_just_under_the_target(q, steps, target):
    sigma = calibrate_noise([], q, steps, target, 1e-5)
    spent = epsilon([(sigma, q, steps)], 1e-5)
    assert 0.995 * target < spent <= target
    assert epsilon([(sigma * 0.99, q, steps)], 1e-5) > spent


def test_calibration_accounts_for_what_was_already_spent():
    prior = [(2.0, 0.1, 100)]
    sigma_fresh = calibrate_noise([], 0.1, 100, 3.0, 1e-5)
    sigma_after = calibrate_noise(prior, 0.1, 100, 3.0, 1e-5)
    assert sigma_after > sigma_fresh
    assert epsilon(prior + [(sigma_after, 0.1, 100)], 1e-5) <= 3.0
