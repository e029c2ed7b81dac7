"""MinHash LSH over the signatures of a whole run: bands x rows for a Jaccard threshold, candidate pairs from
band buckets (one band at a time, so memory is one dict of the documents' band keys), each candidate checked on
its full signature, and connected components (union-find) as clusters; the smallest document id of a cluster is
kept.

Why the candidate check: a banding whose S-curve passes the threshold with probability >= 0.99 (so that pairs at
the threshold are found) also makes candidates of pairs well below it (about 0.28 at Jaccard 0.5 with 21 x 6).
The estimated Jaccard of the full signature (fraction of equal values) has a standard deviation of
sqrt(J (1 - J) / num_perm); a candidate is joined when its estimate is at least ``threshold - 2.5 sigma``
(0.71 for 0.8 and 128 permutations), which keeps 99.4% of pairs at the threshold and few well below it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

RECALL_AT_THRESHOLD = 0.99


def candidate_probability(j: float, bands: int, rows: int) -> float:
    """P(two documents with Jaccard j share at least one band): 1 - (1 - j^rows)^bands."""
    return 1.0 - (1.0 - j ** rows) ** bands


def choose_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows): the most rows (fewest candidates below the threshold) whose largest band count within
    ``num_perm`` still finds a pair at ``threshold`` with probability >= 0.99."""
    best = (num_perm, 1)
    for rows in range(1, num_perm + 1):
        bands = num_perm // rows
        if bands >= 1 and candidate_probability(threshold, bands, rows) >= RECALL_AT_THRESHOLD:
            best = (bands, rows)
    return best


def verify_threshold(threshold: float, num_perm: int) -> float:
    """The least estimated Jaccard at which a candidate pair is joined (see the module doc)."""
    return max(0.0, threshold - 2.5 * math.sqrt(threshold * (1 - threshold) / num_perm))


class UnionFind:
    def __init__(self) -> None:
        self.parent: dict[int, int] = {}

    def find(self, x: int) -> int:
        root = x
        while self.parent.get(root, root) != root:
            root = self.parent[root]
        while x != root:  # path compression
            self.parent[x], x = root, self.parent.get(x, x)
        return root

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id is the root: it is the document a cluster keeps
            self.parent[max(ra, rb)] = min(ra, rb)


def clusters(shards: Iterable[tuple[np.ndarray, np.ndarray]], bands: int, rows: int, min_estimate: float
             ) -> tuple[dict[int, int], int, int]:
    """Near-duplicate clusters. ``shards``: (doc ids, their signatures) per shard, re-iterable (memory-mapped
    arrays). Returns ({doc id: kept id of its cluster} for every document in a cluster of two or more, candidate
    pairs seen, candidate pairs rejected by the signature check)."""
    shards = list(shards)
    where: dict[int, tuple[int, int]] = {}
    for s, (ids, _) in enumerate(shards):
        for i, doc_id in enumerate(ids.tolist()):
            where[doc_id] = (s, i)
    uf, seen, rejected = UnionFind(), 0, 0
    for b in range(bands):
        buckets: dict[bytes, int] = {}
        cols = slice(b * rows, (b + 1) * rows)
        for ids, sigs in shards:
            keys = np.ascontiguousarray(sigs[:, cols])
            for doc_id, key in zip(ids.tolist(), keys):
                k = key.tobytes()
                first = buckets.setdefault(k, doc_id)
                if first == doc_id or uf.find(first) == uf.find(doc_id):
                    continue
                seen += 1
                sa, ia = where[first]
                estimate = float(np.mean(shards[sa][1][ia] == sigs[where[doc_id][1]]))
                if estimate >= min_estimate:
                    uf.union(first, doc_id)
                else:
                    rejected += 1
    groups: dict[int, int] = {}
    for doc_id in list(uf.parent):
        groups[doc_id] = root = uf.find(doc_id)
        groups[root] = root
    return groups, seen, rejected
