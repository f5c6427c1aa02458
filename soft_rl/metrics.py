"""Evaluation metrics: unbiased pass@k and the paper's first-k pass@k."""

from __future__ import annotations

from collections.abc import Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples with c correct: 1 - C(n - c, k) / C(n, k).

    The probability that a uniformly drawn k-subset of the n samples holds at least one correct one.
    Computed as 1 - prod_{i = n - c + 1}^{n} (1 - k / i) to stay exact-ish for large n.
    """
    if not (0 <= c <= n) or not (1 <= k <= n):
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n} c={c} k={k}")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def first_k_pass(outcomes: Sequence[bool], k: int) -> float:
    """The paper's Pass@k: 1.0 if any of the first k samples (in generation order) is correct."""
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    return float(any(outcomes[:k]))


def powers_of_two_upto(n: int) -> list[int]:
    ks, k = [], 1
    while k <= n:
        ks.append(k)
        k *= 2
    return ks
