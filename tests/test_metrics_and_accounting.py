"""Fast re-implementations agree with the references they replace."""

from __future__ import annotations

import math

import numpy as np
import pytest
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as opacus_rdp
from opacus.accountants.analysis.prv import PoissonSubsampledGaussianPRV
from scipy import integrate
from scipy.optimize import brentq
from scipy.stats import norm
from sklearn import metrics as skm

from fedcare.client.privacy import (ALPHAS, _INTEGER_ORDERS, _rdp_integer_orders, _TruncatedPRV, calibrate_noise,
                                    epsilon, prv_epsilon, rdp_epsilon, rdp_per_step)
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
        assert rdp_epsilon([(sigma, q, steps)], 1e-5) == pytest.approx(want, rel=1e-9)


def test_rdp_orders_extend_opacus_defaults():
    """The PRV domain is sized with Opacus' default orders, read as a prefix of ALPHAS."""
    assert ALPHAS[:len(RDPAccountant.DEFAULT_ALPHAS)] == list(RDPAccountant.DEFAULT_ALPHAS)


@pytest.mark.parametrize("history,delta", [
    ([(4.0, 0.6, 40)], 1e-3), ([(1.4, 0.05, 2000)], 1e-4), ([(8.4, 1.0, 5)], 1e-5),
    ([(4.0, 0.6, 40), (3.0, 0.3, 80)], 1e-3), ([(0.9, 0.01, 3000), (2.0, 0.2, 50)], 1e-5)])
def test_prv_equals_opacus_and_epsilon_is_the_smaller_bound(history, delta):
    reference = PRVAccountant()
    reference.history = list(history)
    prv = prv_epsilon(history, delta)
    assert prv == pytest.approx(reference.get_epsilon(delta), rel=1e-6)  # the mean's quadrature differs
    rdp = rdp_epsilon(history, delta)
    assert epsilon(history, delta) == pytest.approx(min(rdp, prv), rel=1e-12)  # composed in sorted order
    assert prv < rdp  # the regimes fedcare runs in: PRV is the tighter of the two


@pytest.mark.parametrize("sigma,q,half_width", [(0.5, 1e-4, 4.5), (0.5, 0.02, 15.0), (1.4, 0.14, 8.0),
                                                (4.0, 0.6, 40.0), (20.0, 1.0, 4.5)])
def test_truncated_prv_mean_matches_a_tight_quadrature(sigma, q, half_width):
    """The mean the discretisation preserves, against scipy's adaptive quadrature run to
    1e-15 on the same pieces (Opacus' default quadrature misses the first case by 4 %)."""
    prv = _TruncatedPRV(PoissonSubsampledGaussianPRV(q, sigma), -half_width, half_width)
    points = prv.pieces()
    want = 0.0
    for a, b in zip(points[:-1], points[1:]):
        area, _ = integrate.quad(lambda t: float(prv.cdf(t)), a, b, limit=1000, epsabs=1e-15, epsrel=1e-13)
        want += b * float(prv.cdf(b)) - a * float(prv.cdf(a)) - area
    assert prv.mean() == pytest.approx(want, rel=1e-9, abs=1e-13)


@pytest.mark.parametrize("sigma,steps,delta", [(1.0, 1, 1e-5), (2.0, 10, 1e-5), (8.4, 5, 1e-5), (4.0, 40, 1e-3),
                                             (0.8, 3, 1e-6), (20.0, 200, 1e-5)])
def test_prv_bounds_the_exact_gaussian_mechanism_from_above_within_its_error(sigma, steps, delta):
    """Without subsampling the composition is known exactly: k Gaussian mechanisms of noise
    σ are one of noise σ/√k, whose δ(ε) is Balle and Wang's (2018) closed form. PRV must
    bound it from above (it is a guarantee) and by no more than its error budget."""
    mu = math.sqrt(steps) / sigma

    def delta_at(eps: float) -> float:
        return norm.cdf(mu / 2 - eps / mu) - math.exp(eps) * norm.cdf(-mu / 2 - eps / mu) - delta

    exact = brentq(delta_at, 0.0, 200.0)
    prv = prv_epsilon([(sigma, 1.0, steps)], delta)
    assert exact <= prv <= exact + 0.011
    assert prv < rdp_epsilon([(sigma, 1.0, steps)], delta)


def test_epsilon_composes_rounds_like_one_entry():
    """Rounds of equal (σ, q) are one mechanism run for their total steps, in any order."""
    rounds = [(2.0, 0.1, 7)] * 5 + [(3.0, 0.2, 4)] * 2
    assert epsilon(rounds, 1e-5) == epsilon([(3.0, 0.2, 8), (2.0, 0.1, 35)], 1e-5)
    assert epsilon(rounds + [(1.0, 0.0, 9)], 1e-5) == epsilon(rounds, 1e-5)


def test_prv_skipped_where_its_grid_is_too_large_and_rdp_remains():
    history = [(0.5, 0.01, 100_000)]
    assert prv_epsilon(history, 1e-5) is None
    assert epsilon(history, 1e-5) == rdp_epsilon(history, 1e-5)


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
