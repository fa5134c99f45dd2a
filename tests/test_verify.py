"""TBVM maths: pure functions, checked against their formulas."""

from __future__ import annotations

import math

import pytest

from dreamr_stream.verify import JudgeVerifier, LikelihoodVerifier, decide, ratio_of


@pytest.mark.parametrize(
    ("p_pos", "p_neg", "ratio"),
    [(0.6, 0.2, 3.0), (0.2, 0.6, 1 / 3), (0.5, 0.0, math.inf), (0.0, 0.5, 0.0), (0.0, 0.0, 0.0), (math.nan, 0.1, 0.0)],
)
def test_ratio(p_pos: float, p_neg: float, ratio: float) -> None:
    assert ratio_of(p_pos, p_neg) == pytest.approx(ratio)


@pytest.mark.parametrize("tau", [0.25, 0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("p_pos", [0.05, 0.3, 0.5, 0.7, 0.95])
def test_ratio_rule_equals_normalised_rule(tau: float, p_pos: float) -> None:
    p_neg = 1.0 - p_pos - 0.01
    v = decide(p_pos, p_neg, tau)
    assert v.accepted == (p_pos / (p_pos + p_neg) >= tau / (1 + tau) - 1e-12)
    assert (v.p_pos, v.p_neg, v.tau) == (p_pos, p_neg, tau)


def test_extreme_taus() -> None:
    assert decide(0.0, 0.0, 0.0).accepted  # tau = 0 accepts everything
    assert decide(1e-9, 1.0, 0.0).accepted
    assert not decide(1.0, 0.0, math.inf).accepted  # tau = inf rejects everything
    assert not decide(0.0, 0.0, 1.0).accepted  # missing evidence rejects


def test_judge_verifier_ignores_likelihoods() -> None:
    v = JudgeVerifier(1.0).verify(0.7, 0.2, [-50.0])
    assert v.accepted and v.mode == "judge" and v.ratio == pytest.approx(3.5)


def test_likelihood_verifier_formula() -> None:
    logprobs = [math.log(0.9), math.log(0.4), math.log(0.8)]
    v = LikelihoodVerifier(1.0, "min").verify(0, 0, logprobs)
    assert v.p_pos == pytest.approx(0.4) and not v.accepted  # 0.4 / 0.6 < 1
    g = math.exp(sum(logprobs) / 3)
    v = LikelihoodVerifier(1.0, "mean").verify(0, 0, logprobs)
    assert v.p_pos == pytest.approx(g) and v.ratio == pytest.approx(g / (1 - g)) and v.accepted
    assert not LikelihoodVerifier(0.5).verify(0, 0, []).accepted


def test_recommended_settings_with_overrides_and_the_verifier_they_make() -> None:
    from dreamr_stream.config import VerificationConfig
    from dreamr_stream.verify import JudgeVerifier, LikelihoodVerifier, make_verifier

    rec = {"mode": "likelihood", "tau": 0.25}
    kept = VerificationConfig.recommended(rec, tau=None, mode=None)
    assert (kept.mode, kept.tau) == ("likelihood", 0.25)
    assert VerificationConfig.recommended(rec, tau=2.0).tau == 2.0
    assert VerificationConfig.recommended({}) == VerificationConfig()
    v = make_verifier(kept)
    assert isinstance(v, LikelihoodVerifier) and v.tau == 0.25 and not v.needs_judge
    j = make_verifier(VerificationConfig(tau=3.0))
    assert isinstance(j, JudgeVerifier) and j.tau == 3.0 and j.needs_judge


def test_a_folder_that_measured_both_modes_gives_each_its_own_tau() -> None:
    from dreamr_stream.config import VerificationConfig

    rec = {"mode": "judge", "tau": 2.0, "taus": {"judge": 2.0, "likelihood": 0.25}}
    assert VerificationConfig.recommended(rec) == VerificationConfig(mode="judge", tau=2.0)
    other = VerificationConfig.recommended(rec, mode="likelihood")
    assert (other.mode, other.tau) == ("likelihood", 0.25)
    assert VerificationConfig.recommended(rec, mode="likelihood", tau=1.0).tau == 1.0
    # one measured mode only: the other mode does not inherit its tau (another scale)
    alone = VerificationConfig.recommended({"mode": "likelihood", "tau": 0.25}, mode="judge")
    assert (alone.mode, alone.tau) == ("judge", VerificationConfig().tau)
