"""Small, exact statistics for evaluation: mean intervals, paired win rates, paired t-tests.

No scipy (it is not a dependency): Student t tail probabilities come from the regularized incomplete beta
function, evaluated with the continued fraction of Numerical Recipes (Press et al., 3rd ed., §6.4, modified Lentz),
accurate to ~1e-12; t quantiles invert that CDF by bisection. Normal quantiles use `statistics.NormalDist`.
Inputs are any iterables of finite numbers (lists, numpy arrays, 1-d tensors); NaN/inf raise `ValueError`.
"""
from __future__ import annotations

import math
from statistics import NormalDist
from typing import Any, Dict, Hashable, Iterable, List, Sequence, Tuple


def _floats(values: Iterable[float], name: str) -> List[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} is empty: need at least one value")
    if not all(math.isfinite(v) for v in out):
        raise ValueError(f"{name} contains NaN or inf: {out}")
    return out


def _pair(a: Iterable[float], b: Iterable[float]) -> Tuple[List[float], List[float]]:
    a, b = _floats(a, "a"), _floats(b, "b")
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: len(a)={len(a)}, len(b)={len(b)}")
    return a, b


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")


def _betainc(a: float, b: float, x: float) -> float:
    """Regularized incomplete beta I_x(a, b) by its continued fraction (Numerical Recipes §6.4, Lentz)."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    if x > (a + 1.0) / (a + b + 2.0):  # the fraction converges fast only below this point: use symmetry
        return 1.0 - _betainc(b, a, 1.0 - x)
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    tiny = 1e-300
    c, d = 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    f = d
    for m in range(1, 300):
        for num in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                    -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            f *= c * d
        if abs(c * d - 1.0) < 1e-15:
            break
    return front * f / a


def t_two_sided_p(t: float, df: float) -> float:
    """P(|T| >= |t|) for Student's t with df degrees of freedom: I_{df/(df+t^2)}(df/2, 1/2)."""
    return _betainc(df / 2.0, 0.5, df / (df + t * t))


def t_quantile(q: float, df: float) -> float:
    """The q-quantile of Student's t (q in (0.5, 1)), by bisection on the exact two-sided tail."""
    if not 0.5 < q < 1.0:
        raise ValueError(f"t_quantile needs q in (0.5, 1), got {q}")
    target, lo, hi = 2.0 * (1.0 - q), 0.0, 1.0
    while t_two_sided_p(hi, df) > target:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > target else (lo, mid)
    return 0.5 * (lo + hi)


def mean_ci(values: Iterable[float], level: float = 0.95) -> Dict[str, float]:
    """Mean with a Student t interval: mean ± t_{(1+level)/2, n-1} · s / √n (s = sample sd, n-1 denominator).

    With n == 1 the spread is unknown: std, low and high are NaN.
    """
    _check_level(level)
    x = _floats(values, "values")
    n, mean = len(x), math.fsum(x) / len(x)
    if n < 2:
        return {"mean": mean, "low": math.nan, "high": math.nan, "n": n, "std": math.nan}
    std = math.sqrt(math.fsum((v - mean) ** 2 for v in x) / (n - 1))
    half = t_quantile((1.0 + level) / 2.0, n - 1) * std / math.sqrt(n)
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": n, "std": std}


def sign_test_p(wins: int, losses: int) -> float:
    """Two-sided exact sign test: 2 · P(Binomial(wins + losses, 1/2) <= min(wins, losses)), capped at 1."""
    m, k = wins + losses, min(wins, losses)
    if m == 0:
        return 1.0
    # integer numerator and denominator: Python divides big ints exactly rounded; 2.0 ** m overflows past m = 1023.
    # Each C(m, i + 1) from C(m, i): one math.comb per term took 29 s at 20,000 pairs.
    total = term = 1
    for i in range(k):
        term = term * (m - i) // (i + 1)
        total += term
    return min(1.0, 2 * total / 2 ** m)


def wilson_interval(p_hat: float, n: int, level: float = 0.95) -> Tuple[float, float]:
    """Wilson (1927) score interval: (p̂ + z²/2n ± z·√(p̂(1-p̂)/n + z²/4n²)) / (1 + z²/n)."""
    z = NormalDist().inv_cdf((1.0 + level) / 2.0)
    denom = 1.0 + z * z / n
    center = (p_hat + z * z / (2 * n)) / denom
    half = z / denom * math.sqrt(p_hat * (1.0 - p_hat) / n + z * z / (4 * n * n))
    return max(0.0, center - half), min(1.0, center + half)


def _rounding(a: Sequence[float], b: Sequence[float]) -> float:
    """What differences of these scores are rounding: 1e-6 of the largest (float32 rewards carry ~1e-7 of their
    size; sums of judge verdicts ~1e-17), whatever their scale (0 when every score is 0)."""
    return 1e-6 * max([0.0] + [abs(x) for x in a] + [abs(y) for y in b])


def win_rate(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> Dict[str, float]:
    """Paired win rate of a (tuned) over b (base), same prompts and seeds: (wins + ties/2) / n.

    Interval: Wilson (1927) score interval on that rate with n = all pairs, ties counted as half a win (an
    approximation: a tie is treated like half a Bernoulli success, which slightly overstates the variance when
    ties are common). p_value: two-sided exact sign test on wins vs losses, ties dropped (Dixon & Mood 1946). Pairs
    within rounding of each other (1e-6 of the largest score: 0.1 + 0.2 against 0.3) are ties.
    """
    _check_level(level)
    a, b = _pair(a, b)
    tol = _rounding(a, b)  # 0.1 + 0.2 against 0.3 is a tie, as in `clustered_diff`
    wins = sum(x - y > tol for x, y in zip(a, b))
    losses = sum(y - x > tol for x, y in zip(a, b))
    return win_counts(wins, losses, len(a) - wins - losses, level)


def win_counts(wins: int, losses: int, ties: int, level: float = 0.95) -> Dict[str, float]:
    """`win_rate`'s result from its counts."""
    n = wins + losses + ties
    rate = (wins + 0.5 * ties) / n
    low, high = wilson_interval(rate, n, level)
    return {"win_rate": rate, "low": low, "high": high, "wins": wins, "losses": losses, "ties": ties, "n": n,
            "p_value": sign_test_p(wins, losses)}


def paired_diff(a: Iterable[float], b: Iterable[float], level: float = 0.95) -> Dict[str, float]:
    """Paired t-test on d = a - b: t = mean(d) / (sd(d)/√n), df = n - 1, two-sided p from Student's t.

    The interval is `mean_ci(d, level)`. Needs n >= 2. When every difference is equal (sd = 0, or within rounding
    of the differences' size: 0.2 - 0.0 and 0.8 - 0.6 give sd ~1e-17, which made t ~1e16; float32 rewards' scores
    ~1e-7 of their size, so within 1e-6 of the largest score) t is undefined: t = 0 and p = 1 if their mean is
    zero within that rounding, else t = NaN (JSON null; not inf, which JSON cannot hold) and p = 0, the limit as
    sd -> 0 (the interval is then the single point mean(d)); the sign test is the one to read then.
    """
    a, b = _pair(a, b)
    if len(a) < 2:
        raise ValueError(f"paired_diff needs at least 2 pairs, got {len(a)}")
    ci = mean_ci([x - y for x, y in zip(a, b)], level)
    n, mean, std = ci["n"], ci["mean"], ci["std"]
    tol = _rounding(a, b)
    if std <= tol:
        # a mean within rounding of 0 (a model against itself on nondeterministic GPU kernels) is no difference
        t, p = (0.0, 1.0) if abs(mean) <= tol else (math.nan, 0.0)
    else:
        t = mean / (std / math.sqrt(n))
        p = t_two_sided_p(t, n - 1)
    return {"mean_diff": mean, "low": ci["low"], "high": ci["high"], "p_value": p, "t": t, "n": n}


def clustered_diff(a: Iterable[float], b: Iterable[float], groups: Sequence[Hashable],
                   level: float = 0.95) -> Dict[str, Any]:
    """Paired a − b with the group (a prompt) as the unit: the images of one prompt at several seeds share its
    difficulty, so they are not independent pairs, and tests over images overstate the evidence. The paired
    t-test (`paired_diff`) and the exact sign test (`sign_test_p`) run over the groups' mean differences: a
    cluster-level paired test, n = the number of groups (first-seen order)."""
    a, b = _pair(a, b)
    if len(groups) != len(a):
        raise ValueError(f"len(groups)={len(groups)}, len(a)={len(a)}: one group per pair")
    members: Dict[Hashable, List[float]] = {}
    for group, x, y in zip(groups, a, b):
        members.setdefault(group, []).append(x - y)
    # a mean that is zero but for rounding (0.8 - 0.6 + 0.4 - 0.6 = 5.6e-17; ~1e-8 for a reward's float32 scores)
    # is a tie, not a win or a loss
    tol = 1e-6 * max([1.0] + [abs(d) for diffs in members.values() for d in diffs])
    means = [m if abs(m) > tol else 0.0 for m in (math.fsum(d) / len(d) for d in members.values())]
    if len(means) < 2:
        raise ValueError(f"clustered_diff needs at least 2 groups, got {len(means)}")
    wins, losses = sum(m > 0 for m in means), sum(m < 0 for m in means)
    # each prompt's win rate (ties half, as `win_rate`), their mean with a t interval over the prompts: the
    # Wilson interval of `win_rate` counts images as independent and is too narrow here
    rates = [(sum(d > tol for d in ds) + 0.5 * sum(abs(d) <= tol for d in ds)) / len(ds) for ds in members.values()]
    rate = mean_ci(rates, level)  # a rate's interval within [0, 1] (few prompts gave [-2.68, 3.68])
    rate.update({k: min(1.0, max(0.0, rate[k])) for k in ("low", "high") if not math.isnan(rate[k])})
    if rate["std"] <= 1e-12:  # every prompt at one rate (but rounding) is no certainty: Wilson, n = the prompts
        rate["low"], rate["high"] = wilson_interval(rate["mean"], len(rates), level)
    return {**paired_diff(means, [0.0] * len(means), level), "groups": len(means),
            "sign": {"wins": wins, "losses": losses, "p_value": sign_test_p(wins, losses)}, "win_rate": rate}


def holm(p_values: Dict[str, float]) -> Dict[str, float]:
    """Holm's step-down adjustment (Holm 1979) of a family of p-values: the k-th smallest (k = 0..m-1) times m - k,
    made non-decreasing in that order, capped at 1. Controls the family-wise error over e.g. a table's attributes."""
    if any(not 0.0 <= p <= 1.0 for p in p_values.values()):  # NaN too: it would break the order
        raise ValueError(f"p-values must be in [0, 1], got {p_values}")
    order = sorted(p_values, key=p_values.get)
    adjusted, running = {}, 0.0
    for k, name in enumerate(order):
        running = max(running, min(1.0, (len(order) - k) * p_values[name]))
        adjusted[name] = running
    return adjusted
