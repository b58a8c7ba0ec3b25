"""Hand-computed checks of t2i_align.stats (reference values from printed tables / direct arithmetic)."""
import math

import pytest

from t2i_align.stats import mean_ci, paired_diff, sign_test_p, t_quantile, t_two_sided_p, win_rate, wilson_interval


def test_t_quantiles_match_tables():
    assert t_quantile(0.975, 3) == pytest.approx(3.18245, abs=1e-5)
    assert t_quantile(0.975, 1) == pytest.approx(12.7062, abs=1e-4)
    assert t_quantile(0.995, 10) == pytest.approx(3.16927, abs=1e-5)
    assert t_quantile(0.975, 1e7) == pytest.approx(1.959964, abs=1e-5)  # -> normal


def test_t_tail_closed_forms():
    # df=1 is Cauchy: P(|T|>=1) = 1/2; df=2: P(|T|>=t) = 1 - t/sqrt(t^2+2).
    assert t_two_sided_p(1.0, 1) == pytest.approx(0.5, abs=1e-12)
    assert t_two_sided_p(3.0, 2) == pytest.approx(1 - 3 / math.sqrt(11), abs=1e-12)
    assert t_two_sided_p(0.0, 7) == pytest.approx(1.0)


def test_mean_ci_hand_computed():
    # mean 2.5, s = sqrt(5/3) = 1.29099, half = 3.18245 * 1.29099 / 2 = 2.05426
    ci = mean_ci([1, 2, 3, 4])
    assert ci["mean"] == 2.5 and ci["n"] == 4
    assert ci["std"] == pytest.approx(1.290994, abs=1e-6)
    assert ci["low"] == pytest.approx(2.5 - 2.05426, abs=1e-4)
    assert ci["high"] == pytest.approx(2.5 + 2.05426, abs=1e-4)


def test_mean_ci_single_value_and_constant():
    one = mean_ci([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["low"]) and math.isnan(one["std"])
    const = mean_ci([2.0, 2.0, 2.0])
    assert const["low"] == const["high"] == 2.0


def test_sign_test_and_wilson():
    assert sign_test_p(8, 2) == pytest.approx(0.109375)  # 2 * (1 + 10 + 45) / 1024
    assert sign_test_p(2, 8) == pytest.approx(0.109375)
    assert sign_test_p(5, 5) == 1.0 and sign_test_p(0, 0) == 1.0
    assert sign_test_p(0, 7) == 2 / 128 and sign_test_p(9, 1) == 2 * 11 / 1024
    # past 1023 untied pairs 2.0 ** m overflowed (72 users x 80 images); exact values from fractions.Fraction
    assert sign_test_p(1100, 900) == pytest.approx(8.457089535503927e-06, rel=1e-12)  # normal approx. 7.7e-6
    assert sign_test_p(2000, 1000) == pytest.approx(1.0090148627941341e-75, rel=1e-12)
    assert sign_test_p(3000, 3000) == 1.0
    low, high = wilson_interval(0.7, 10)
    assert (low, high) == (pytest.approx(0.3968, abs=1e-4), pytest.approx(0.8922, abs=1e-4))


def test_win_rate_counts_ties_as_half():
    a = [1.0] * 7 + [0.0] * 2 + [0.5]
    b = [0.0] * 7 + [1.0] * 2 + [0.5]
    r = win_rate(a, b)
    assert (r["wins"], r["losses"], r["ties"], r["n"]) == (7, 2, 1, 10)
    assert r["win_rate"] == pytest.approx(0.75)
    assert r["p_value"] == pytest.approx(2 * (1 + 9 + 36) / 512)  # sign test on 7 vs 2, tie dropped
    # Wilson, z = 1.959964, n = 10: centre (0.75 + 0.19207) / 1.38415 = 0.68062, half 0.23843
    assert (r["low"], r["high"]) == (pytest.approx(0.44218, abs=1e-4), pytest.approx(0.91905, abs=1e-4))


def test_win_rate_8_of_10():
    r = win_rate([1] * 8 + [0] * 2, [0] * 8 + [1] * 2)
    assert r["win_rate"] == 0.8 and r["p_value"] == pytest.approx(0.109375)


def test_sample_against_itself_is_a_coin_flip():
    x = [0.1, 0.5, 0.3, 0.9]
    r = win_rate(x, x)
    assert r["win_rate"] == 0.5 and r["ties"] == 4 and r["p_value"] == 1.0
    # Wilson at p = 0.5, n = 4: centre 0.5, half z·sqrt(1/16 + z²/64) / (1 + z²/4) = 0.34996
    assert (r["low"], r["high"]) == (pytest.approx(0.15004, abs=1e-4), pytest.approx(0.84996, abs=1e-4))
    d = paired_diff(x, x)
    assert d["mean_diff"] == 0.0 and d["p_value"] == 1.0


def test_paired_diff_hand_computed():
    # d = [1, 0, 2, 3, 3]: mean 1.8, s = sqrt(1.7), t = 1.8 / (s / sqrt 5) = 3.08697, df 4 -> p = 0.03668
    d = paired_diff([1, 2, 3, 4, 5], [0, 2, 1, 1, 2])
    assert d["mean_diff"] == pytest.approx(1.8)
    assert d["t"] == pytest.approx(3.086975, abs=1e-5)
    assert d["p_value"] == pytest.approx(0.036682, abs=1e-5)
    half = t_quantile(0.975, 4) * math.sqrt(1.7) / math.sqrt(5)  # 2.776445 * 0.583095 = 1.61893
    assert d["low"] == pytest.approx(1.8 - half) and half == pytest.approx(1.61893, abs=1e-4)


@pytest.mark.parametrize("call, message", [
    (lambda: mean_ci([]), "values is empty"),
    (lambda: win_rate([], []), "a is empty"),
    (lambda: win_rate([1, 2], [1]), r"len\(a\)=2, len\(b\)=1"),
    (lambda: paired_diff([1, 2, 3], [1, 2]), r"len\(a\)=3, len\(b\)=2"),
    (lambda: paired_diff([1], [0]), "at least 2 pairs, got 1"),
    (lambda: mean_ci([1.0, float("nan")]), "contains NaN or inf"),
    (lambda: mean_ci([1, 2], level=95), r"level must be in \(0, 1\), got 95"),
])
def test_bad_inputs_raise_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_length_mismatch_message_is_clear():
    with pytest.raises(ValueError, match=r"len\(a\)=2, len\(b\)=1"):
        win_rate([1, 2], [1])
    with pytest.raises(ValueError, match="empty"):
        mean_ci([])


def test_equal_differences_give_no_t_and_the_documented_p():
    """Every pair differing by 0.25: sd(d) = 0, so t was inf (written to compare.json as `Infinity`, not JSON)."""
    from t2i_align.evaluation import compare_scores

    d = compare_scores([0.5, 0.25, 0.5], [0.75, 0.5, 0.75])["paired_diff"]
    assert math.isnan(d["t"]) and d["p_value"] == 0.0 and d["n"] == 3
    assert d["mean_diff"] == d["low"] == d["high"] == 0.25
    same = paired_diff([0.5, 0.25], [0.5, 0.25])  # all zero: t 0, p 1, as before
    assert (same["t"], same["p_value"]) == (0.0, 1.0)


def test_a_mean_difference_zero_but_for_rounding_is_no_difference_and_no_win():
    """0.1 + 0.2 against 0.3 (a model against itself on nondeterministic kernels): the mean difference 1.85e-17
    with sd ~1e-17 gave p 0, a 'significant' difference whose own interval held 0; and it counted as a win."""
    same = paired_diff([0.1 + 0.2, 0.7, 0.5], [0.3, 0.7, 0.5])
    assert (same["t"], same["p_value"]) == (0.0, 1.0) and same["low"] <= 0 <= same["high"]
    rate = win_rate([0.1 + 0.2, 0.7, 0.9], [0.3, 0.7, 0.5])
    assert (rate["wins"], rate["losses"], rate["ties"]) == (1, 0, 2)
    small = win_rate([1.5e-6, 1.6e-6, 1.7e-6, 1.8e-6], [1e-6] * 4)  # a metric of small scale keeps its wins
    assert (small["wins"], small["ties"]) == (4, 0)


def test_differences_equal_but_for_rounding_are_equal_differences():
    """Toy-judge steps of 0.2: 0.6 - 0.4 and 0.8 - 0.6 differ by 1e-16, so sd ~1e-17 made t ~6e15 and p 9e-48
    (1.8e-16 per prompt from two prompts), where equal differences are documented as t null."""
    from t2i_align.evaluation import compare_scores

    result = compare_scores([.4, .4, .6, .6], [.6, .6, .8, .8], [0, 0, 1, 1])
    for d in (result["paired_diff"], result["per_prompt"]):
        assert math.isnan(d["t"]) and d["p_value"] == 0.0
    assert result["per_prompt"]["sign"]["p_value"] == 0.5  # the test to read: 2 of 2 prompts
    # scores as a float32 reward returns them: the differences spread ~1e-8 (t 3e7, p 6e-23 from 4 images)
    import numpy as np

    base, tuned = (np.float32(x).item() for x in (.2, .4, .6, .2)), (np.float32(x).item() for x in (.4, .6, .8, .4))
    result = compare_scores(list(base), list(tuned), [0, 0, 1, 1])
    for d in (result["paired_diff"], result["per_prompt"]):
        assert math.isnan(d["t"]) and d["p_value"] == 0.0


def test_a_per_prompt_win_rate_the_same_for_every_prompt_gets_a_wilson_interval():
    """Every prompt at rate 1 (or all tied at 0.5) gave the interval [1, 1] ([0.5, 0.5]): Wilson over the prompts
    instead, as win_rate's over the images but with n = the prompts (here 3: 1/1 -> [0.44, 1])."""
    from t2i_align.stats import clustered_diff

    d = clustered_diff([1.0] * 6, [0.0] * 6, [0, 0, 1, 1, 2, 2])["win_rate"]
    assert (d["mean"], d["high"]) == (1.0, 1.0) and d["low"] == pytest.approx(wilson_interval(1.0, 3)[0])
    assert d["low"] == pytest.approx(0.4385, abs=1e-4)
    tied = clustered_diff([0.5] * 6, [0.5] * 6, [0, 0, 1, 1, 2, 2])["win_rate"]
    assert tied["mean"] == 0.5 and tied["low"] < 0.2 and tied["high"] > 0.8


def test_compare_scores_reads_tuned_against_base():
    """Which side is "tuned" was tested only where tuned won everywhere: base [0, 0, 1], tuned [1, 1, 0] wins 2 of
    3 (rate 2/3), mean difference (1 + 1 - 1) / 3 = 1/3; swapped, 1/3 and -1/3."""
    from t2i_align.evaluation import compare_scores

    forward, backward = compare_scores([0, 0, 1], [1, 1, 0]), compare_scores([1, 1, 0], [0, 0, 1])
    assert forward["win_rate"]["win_rate"] == pytest.approx(2 / 3) and backward["win_rate"]["win_rate"] == \
        pytest.approx(1 / 3)
    assert forward["paired_diff"]["mean_diff"] == pytest.approx(1 / 3)
    assert backward["paired_diff"]["mean_diff"] == pytest.approx(-1 / 3)
    assert (forward["base"]["mean"], forward["tuned"]["mean"]) == (pytest.approx(1 / 3), pytest.approx(2 / 3))


def test_holm_by_hand():
    """p 0.01, 0.04, 0.03, 0.5 (m = 4): sorted 0.01·4 = 0.04, 0.03·3 = 0.09, 0.04·2 = 0.08 -> 0.09 (monotone),
    0.5·1 = 0.5; a p of 0.4 among two becomes min(1, 0.8)."""
    from t2i_align.stats import holm

    assert holm({"a": 0.01, "b": 0.04, "c": 0.03, "d": 0.5}) == pytest.approx({"a": 0.04, "b": 0.09, "c": 0.09,
                                                                              "d": 0.5})
    assert holm({"x": 0.4, "y": 0.6}) == pytest.approx({"x": 0.8, "y": 0.8})
    assert holm({}) == {}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        holm({"a": float("nan"), "b": 0.1})


def test_clustered_diff_tests_the_prompts_mean_differences_by_hand():
    """Three prompts, two seeds each: the per-prompt mean differences are 2, 2, 3 (mean 7/3, sd 1/√3, se 1/3), so
    t = 7 with df = 2, whose two-sided p has the closed form 1 − t/√(t² + 2) = 1 − 7/√51; the 95 % interval is
    7/3 ± 4.302653/3; the sign test sees 3 prompts won of 3: p = 2 · (1/2)³ = 0.25. Over the six images as if
    independent the t-test would give t = 3.796 (sd² = 34/15, n = 6), p = 0.0127: the prompts are the sample."""
    from t2i_align.stats import clustered_diff, paired_diff

    tuned, base = [3, 1, 2, 2, 5, 1], [0] * 6
    out = clustered_diff(tuned, base, ["a", "a", "b", "b", "c", "c"])
    assert out["groups"] == 3 and out["mean_diff"] == pytest.approx(7 / 3)
    assert out["t"] == pytest.approx(7.0) and out["p_value"] == pytest.approx(1 - 7 / math.sqrt(51), abs=1e-10)
    assert (out["low"], out["high"]) == pytest.approx((7 / 3 - 4.302653 / 3, 7 / 3 + 4.302653 / 3), abs=1e-5)
    assert out["sign"] == {"wins": 3, "losses": 0, "p_value": 0.25}
    # every prompt won whole: Wilson's interval with the 3 prompts as its n, not the point [1, 1]
    assert out["win_rate"]["mean"] == out["win_rate"]["high"] == 1.0
    assert out["win_rate"]["low"] == pytest.approx(wilson_interval(1.0, 3)[0])
    # win rates per prompt (ties half): a 2 of 4 + a tie -> 0.625, b 1.0, c 0.25; mean 0.625, sd 0.375, se
    # 0.375/√3, half-width 4.302653 · 0.375/√3 = 0.931555: [-0.307, 1.557], clipped to what a rate can be
    rate = clustered_diff([1, 0, 0, 1, 1, 1, 0, 0], [0, 1, 0, 0, 0, 0, 1, 0], list("aaaabbcc"))["win_rate"]
    assert (rate["mean"], rate["n"], rate["std"]) == (0.625, 3, pytest.approx(0.375))
    assert (rate["low"], rate["high"]) == (0.0, 1.0)
    # five prompts' rates 0, 0.5, 0.5, 0.5, 1: mean 0.5, sd 0.353553, half-width 2.776445 · 0.353553 / √5 = 0.438993
    tuned5 = [0, 0, 1, 0, 1, 0, 1, 0, 1, 1]
    rate = clustered_diff(tuned5, [1 - x for x in tuned5], list("aabbccddee"))["win_rate"]
    assert (rate["low"], rate["high"]) == pytest.approx((0.5 - 0.438993, 0.5 + 0.438993), abs=1e-5)
    per_image = paired_diff(tuned, base)
    assert per_image["t"] == pytest.approx(14 / 6 / math.sqrt(34 / 15 / 6)) and per_image["p_value"] < 0.013
    with pytest.raises(ValueError, match="one group per pair"):
        clustered_diff(tuned, base, ["a", "b"])
    with pytest.raises(ValueError, match="at least 2 groups, got 1"):
        clustered_diff(tuned, base, ["a"] * 6)


def test_compare_scores_tests_per_prompt_after_dropping_non_finite_pairs():
    """Prompt 0's base image that could not be scored (NaN) decides prompt 0 against base; prompt 1's differences
    are +0.25 and −0.25 (mean 0), prompt 2's +0.5 and +0.5: the t-test over prompts 1 and 2 (means 0, 0.5), the sign
    test 2 won (prompt 0 by the failure, prompt 2), 1 tied."""
    from t2i_align.evaluation import compare_scores

    base = [0.0, math.nan, 0.5, 0.5, 0.0, 0.0]
    tuned = [0.5, 0.3, 0.75, 0.25, 0.5, 0.5]
    out = compare_scores(base, tuned, groups=[0, 0, 1, 1, 2, 2])
    assert out["dropped_nonfinite"] == 1 and out["per_prompt"]["groups"] == 2
    assert out["per_prompt"]["mean_diff"] == pytest.approx(0.25)
    assert out["per_prompt"]["sign"] == {"wins": 2, "losses": 0, "p_value": 0.5}
    assert out["per_prompt"]["decided_by_nonfinite"] == {"base": 1, "tuned": 0}
    assert "per_prompt" not in compare_scores(base, tuned)  # no groups: the image tests only
    assert "per_prompt" not in compare_scores(base, tuned, groups=[0, 1, 2, 3, 4, 5])  # one image per prompt


def test_clustered_diff_takes_a_mean_difference_zero_but_for_rounding_as_a_tie():
    """Judge scores are fifths: prompt a's differences 0.8 − 0.6 and 0.4 − 0.6 sum to 5.6e-17 in floats, prompt b's
    0.6 − 0.4 and 0.6 − 0.8 to −5.6e-17. Both are ties (they counted as a win and a loss), and prompt c's +0.2 the
    one win: the sign test sees 1 of 1, p = 1; the t-test's mean is 0.2 / 3."""
    from t2i_align.stats import clustered_diff

    out = clustered_diff([0.8, 0.4, 0.6, 0.6, 0.8, 0.8], [0.6, 0.6, 0.4, 0.8, 0.6, 0.6], [0, 0, 1, 1, 2, 2])
    assert out["sign"] == {"wins": 1, "losses": 0, "p_value": 1.0}
    assert out["mean_diff"] == pytest.approx(0.2 / 3)


def test_clustered_diff_ties_hold_for_float32_scores():
    """A reward's float32 scores (0.8, 0.6, 0.4 as float32, then Python floats): prompt a's mean difference is
    ~1e-8, not 1e-17; still a tie (compare.py counted it as a win or a loss)."""
    import numpy as np

    from t2i_align.stats import clustered_diff

    tuned = [float(x) for x in np.array([0.8, 0.4, 0.6, 0.6, 0.8, 0.8], dtype=np.float32)]
    base = [float(x) for x in np.array([0.6, 0.6, 0.4, 0.8, 0.6, 0.6], dtype=np.float32)]
    assert clustered_diff(tuned, base, [0, 0, 1, 1, 2, 2])["sign"] == {"wins": 1, "losses": 0, "p_value": 1.0}


def test_holm_over_rewards_adjusts_each_test_over_the_rewards():
    """Per prompt when every reward has per_prompt, else the image tests of all (one unit per family).
    t: 0.01, 0.04 -> 2·0.01 = 0.02, max(0.02, 0.04) = 0.04; sign: 0.5, 0.2 -> 2·0.2 = 0.4, max(0.4, 0.5) = 0.5."""
    from t2i_align.evaluation import holm_over_rewards

    a = {"per_prompt": {"p_value": 0.01, "sign": {"p_value": 0.5}}, "paired_diff": {"p_value": 0.003},
         "win_rate": {"p_value": 0.3}}
    b = {"per_prompt": {"p_value": 0.04, "sign": {"p_value": 0.2}}, "paired_diff": {"p_value": 0.001},
         "win_rate": {"p_value": 0.1}}
    assert holm_over_rewards({"a": a, "b": b}) == {"t_test": pytest.approx({"a": 0.02, "b": 0.04}),
                                                   "sign_test": pytest.approx({"a": 0.5, "b": 0.4}), "unit": "prompt"}
    # b without per_prompt (its non-finite scores left one image per prompt): every reward's image tests
    # t: 0.003, 0.001 -> 0.002, max(0.002, 0.003) = 0.003; sign: 0.3, 0.1 -> 0.2, 0.3
    del b["per_prompt"]
    assert holm_over_rewards({"a": a, "b": b}) == {"t_test": pytest.approx({"a": 0.003, "b": 0.002}),
                                                   "sign_test": pytest.approx({"a": 0.3, "b": 0.2}), "unit": "image"}
    # every difference of b equal: its t-test's p of 0 (a limit) entered the family as its smallest, halving a's
    # adjustment; the sign test's 0.1 stands in: t: 0.003, 0.1 -> 2·0.003 = 0.006, 0.1
    b["paired_diff"] = {"p_value": 0.0, "t": math.nan}
    assert holm_over_rewards({"a": a, "b": b}) == {"t_test": pytest.approx({"a": 0.006, "b": 0.1}),
                                                   "sign_test": pytest.approx({"a": 0.3, "b": 0.2}), "unit": "image",
                                                   "t_test_from_sign_test": ["b"]}


def test_an_image_only_one_side_could_not_score_is_that_sides_loss():
    """Tuned +0.1 on 5 images and NaN (diverged) on 5 more won 5-0 (p 0.06), judged on its healthy images alone;
    now 5 wins, 5 losses: rate 0.5, sign p 1. The paired difference still drops those pairs."""
    from t2i_align.evaluation import compare_scores

    base = [0.1 * i for i in range(10)]
    tuned = [0.1 * i + 0.1 for i in range(5)] + [math.nan] * 5
    out = compare_scores(base, tuned)
    assert (out["win_rate"]["wins"], out["win_rate"]["losses"], out["win_rate"]["win_rate"]) == (5, 5, 0.5)
    assert out["win_rate"]["p_value"] == 1.0 and out["nonfinite_only"] == {"base": 0, "tuned": 5}
    assert out["dropped_nonfinite"] == 5 and out["paired_diff"]["n"] == 5
    # per prompt (the p-values README says to read): 6 prompts x 2 seeds, tuned +0.1 on prompts 0-2, NaN on 3-5:
    # it won 3 of 3 prompts (sign p 0.25); now 3 wins, 3 losses (p 1); the t-test covers prompts 0-2
    groups = [p for p in range(6) for _ in range(2)]
    base = [0.1 * i for i in range(12)]
    tuned = [b + 0.1 if g < 3 else math.nan for b, g in zip(base, groups)]
    per_prompt = compare_scores(base, tuned, groups)["per_prompt"]
    assert per_prompt["sign"] == {"wins": 3, "losses": 3, "p_value": 1.0} and per_prompt["groups"] == 3
    assert per_prompt["decided_by_nonfinite"] == {"base": 0, "tuned": 3}
