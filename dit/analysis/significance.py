"""The statistics of a study, seeds as replicates: the mean over seeds with a 95% confidence interval (Student's t
with n - 1 degrees of freedom), Welch's unequal-variance t-test between two arms, Holm's step-down correction for
the number of pairs at a familywise level of 5%, and what they say in words and tables (which arms differ, and
whether the published order of two arms holds here).
"""

from __future__ import annotations

import itertools
import math
import statistics
import warnings

from scipy import stats

ALPHA = 0.05  # familywise error rate of the pairwise tests; 95% intervals


def mean_ci(values: list[float], level: float = 1 - ALPHA) -> tuple[float, float | None]:
    """Mean and the half-width of its Student-t confidence interval (None from a single value)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return mean, None
    return mean, stats.t.ppf(0.5 + level / 2, n - 1) * statistics.stdev(values) / math.sqrt(n)


def welch(a: list[float], b: list[float], level: float = 1 - ALPHA) -> dict:
    """Welch's unequal-variance t-test of mean(a) - mean(b) (SciPy's): difference, its CI's half-width, p
    (two-sided), degrees of freedom (Welch-Satterthwaite)."""
    diff = statistics.fmean(a) - statistics.fmean(b)
    if min(a) == max(a) and min(b) == max(b):  # no spread in either arm: nothing to test against
        return dict(diff=diff, ci=math.nan, p=math.nan, df=math.nan)
    with warnings.catch_warnings():  # one arm of identical values (e.g. a cost) is exact, not a loss of precision
        warnings.filterwarnings("ignore", "Precision loss occurred", RuntimeWarning)
        test = stats.ttest_ind(a, b, equal_var=False)
    low, high = test.confidence_interval(level)
    return dict(diff=diff, ci=float(high - low) / 2, p=float(test.pvalue), df=float(test.df))


def holm(pvalues: list[float], alpha: float = ALPHA) -> tuple[list[float], list[bool]]:
    """Holm's step-down adjusted p-values and rejections, in the input order."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [0.0] * len(pvalues), 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[i]))
        adjusted[i] = running
    return adjusted, [p <= alpha for p in adjusted]


def pairwise(values: dict[str, list[float]], descending: bool = False) -> list[dict]:
    """Welch's test for every pair of arms with two or more values, arms in order of their mean (lowest first, or
    highest with ``descending``), Holm-corrected over the pairs that can be tested: each pair is welch()'s dict with
    its arms ``a`` and ``b``, ``p_holm`` and ``significant`` (NaN and False where there is no spread to test)."""
    values = {k: v for k, v in values.items() if len(v) >= 2}
    sign = -1 if descending else 1
    order = sorted(values, key=lambda k: sign * statistics.fmean(values[k]))
    pairs = [dict(a=a, b=b, **welch(values[a], values[b])) for a, b in itertools.combinations(order, 2)]
    testable = [p for p in pairs if not math.isnan(p["p"])]
    adjusted, reject = holm([p["p"] for p in testable])
    for p in pairs:
        p["p_holm"], p["significant"] = math.nan, False
    for p, adj, rej in zip(testable, adjusted, reject, strict=True):
        p["p_holm"], p["significant"] = adj, rej
    return pairs


def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def fmt_ci(values: list, spec: str, scale: float = 1.0, unit: str = "") -> str:
    values = [v * scale for v in values if v is not None]
    if not values:
        return "-"
    mean, half = mean_ci(values)
    return f"{format(mean, spec)}{unit}" if half is None else f"{format(mean, spec)} ± {format(half, spec)}{unit}"


def comparisons(arms: dict[str, list[dict]]) -> tuple[list[str], list[dict]]:
    """Pairwise Welch tests on the final FID (arms with >= 2 seeds), Holm-corrected: table and pairs."""
    pairs = pairwise({arm: [s["fid"] for s in summaries if s["fid"] is not None] for arm, summaries in arms.items()})
    if not pairs:
        return [], []
    lines = [
        "| lower FID | higher FID | difference (unadjusted 95% CI) | p (Welch) | p (Holm) | significant |",
        "|---|---|---|---:|---:|---|",
        *[
            f"| {p['a']} | {p['b']} | {p['diff']:.1f} ({p['diff'] - p['ci']:.1f} to {p['diff'] + p['ci']:.1f}) | "
            f"{p['p']:.3g} | {p['p_holm']:.3g} | {'**yes**' if p['significant'] else 'no'} |"
            for p in pairs
        ],
    ]
    return lines, pairs


def verdict(order: list[str], pairs: list[dict]) -> list[str]:
    """Plain sentences: which arms are significantly apart, and which are not."""
    tested = {a for p in pairs for a in (p["a"], p["b"])}
    left_out = [a for a in order if a not in tested]
    note = (
        [f"Not tested (fewer than two seeds with a final FID): {', '.join(f'`{a}`' for a in left_out)}."]
        if left_out
        else []
    )
    if not pairs:
        return ["Fewer than two arms with two or more seeds: no significance test.", *note]
    untestable = [p for p in pairs if math.isnan(p["p"])]
    m = len(pairs) - len(untestable)
    sig = [p for p in pairs if p["significant"]]
    text = [
        f"Test: Welch's t-test on the final FID of each pair of arms (seeds as replicates), Holm's correction over "
        f"the {m} pairs, familywise level {ALPHA:.0%}; the differences' intervals in the table are unadjusted.",
        *note,
    ]
    if untestable:
        text.append(
            "- No spread in either arm, not tested: " + ", ".join(f"`{p['a']}` vs `{p['b']}`" for p in untestable) + "."
        )
    if not sig:
        text.append("No difference in final FID between any two arms is significant at this level.")
        return text
    for a in order:
        worse = [p["b"] for p in sig if p["a"] == a]
        if worse:
            text.append(f"- `{a}` has a significantly lower FID than " + ", ".join(f"`{b}`" for b in worse) + ".")
    tied = [f"`{p['a']}` vs `{p['b']}`" for p in pairs if not p["significant"] and not math.isnan(p["p"])]
    if tied:
        text.append(f"- Not significant ({len(tied)} of {m} pairs): " + ", ".join(tied) + ".")
    return text


def published(keys: list[str], arms: list[str], pairs: list[dict], claims: dict | None = None) -> list[str]:
    """A table: each published ordering of two arms of this study, and whether the study agrees with it
    (the papers' settings are not this study's: a significant opposite order holds here, not there)."""
    if len(keys) != 1:
        return []
    found = {frozenset((p["a"], p["b"])): p for p in pairs}
    rows = []
    for better, worse, source in (claims or {}).get(keys[0], []):
        if better not in arms or worse not in arms:
            continue  # the claim is about an arm this study does not have
        p = found.get(frozenset((better, worse)))
        if p is None:
            rows.append(f"| `{better}` < `{worse}` | {source} | - | - | not tested (an arm has fewer than two seeds) |")
            continue
        diff = p["diff"] if p["a"] == better else -p["diff"]  # FID(better) - FID(worse) here
        direction = "same" if diff < 0 else "opposite" if diff > 0 else "no"
        if math.isnan(p["p"]):
            here = "not tested (no spread in either arm)"
        elif p["significant"]:
            here = "**agrees** (significant)" if diff < 0 else "**opposite order here** (significant)"
        else:
            here = f"{direction} direction, not significant" if diff else "no difference"
        p_holm = "-" if math.isnan(p["p_holm"]) else f"{p['p_holm']:.3g}"
        rows.append(f"| `{better}` < `{worse}` | {source} | {diff:+.1f} | {p_holm} | {here} |")
    if not rows:
        return []
    return [
        "| published order (lower FID first) | source | FID difference here | p (Holm) | this study |",
        "|---|---|---:|---:|---|",
        *rows,
    ]
