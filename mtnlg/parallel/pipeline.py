"""Pipeline stage boundaries: contiguous stages that balance given per-layer costs. Knows nothing of GPT."""

from __future__ import annotations


def balanced_parts(weights: list[float], stages: int, anchors: list[bool] | None = None) -> list[int]:
    """Stage boundaries (``stages + 1`` spec indices) of contiguous stages minimising the heaviest
    stage, each stage holding at least one spec marked in ``anchors`` (default: every spec); ties
    go to the split that puts more work early (the first stage also waits least)."""
    n = len(weights)
    anchors = [True] * n if anchors is None else anchors
    if stages > sum(anchors):
        raise ValueError(f"{stages} pipeline stages for {sum(anchors)} layers")
    prefix, count = [0.0], [0]
    for w, a in zip(weights, anchors):
        prefix.append(prefix[-1] + w)
        count.append(count[-1] + int(a))
    inf = float("inf")
    # best[j][i]: the smallest possible heaviest stage when the first i specs form j stages
    best = [[inf] * (n + 1) for _ in range(stages + 1)]
    cut = [[0] * (n + 1) for _ in range(stages + 1)]
    best[0][0] = 0.0
    for j in range(1, stages + 1):
        for i in range(j, n - (stages - j) + 1):
            for k in range(j - 1, i):
                if count[i] == count[k] or best[j - 1][k] == inf:
                    continue
                cost = max(best[j - 1][k], prefix[i] - prefix[k])
                if cost < best[j][i] - 1e-9 * max(cost, 1.0) or (cost <= best[j][i] and k > cut[j][i]):
                    best[j][i], cut[j][i] = cost, k
    parts = [n]
    for j in range(stages, 0, -1):
        parts.append(cut[j][parts[-1]])
    return parts[::-1]
