"""Splitting a data set across federated clients.

`partition(labels, clients=..., scheme=..., seed=...)` returns, for each client, the sorted
positions 0..n-1 of its examples; the client lists are disjoint and together cover every position.

Schemes:

- ``iid`` — a random shuffle cut into `clients` near-equal parts (sizes differ by at most 1).
- ``dirichlet`` — the standard non-IID label split: for each class, proportions
  p ~ Dirichlet(alpha * 1_clients) cut that class's (shuffled) examples among the clients.
  Small alpha (e.g. 0.1) gives each client a few dominant classes; large alpha (e.g. 100) is close
  to IID. The draw is repeated (up to 100 times) until every client holds at least `min_size`
  examples.
- ``group`` — whole groups (e.g. all reviews of one movie) go to one client: groups are shuffled
  with the seed, then, largest first, each goes to the client currently holding the fewest
  examples (ties: lowest client index), which balances client sizes.

All schemes are deterministic for a seed (numpy.random.default_rng(seed)) and raise
`fedlora.errors.DataError` when the request cannot be met, e.g. any client would get fewer than
`min_size` examples.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import numpy as np

from fedlora.config import PARTITIONS
from fedlora.errors import DataError

__all__ = ["SCHEMES", "DIRICHLET_ATTEMPTS", "label_counts", "partition"]

SCHEMES = PARTITIONS  # declared with the option, in fedlora.config
DIRICHLET_ATTEMPTS = 100


def _is_whole(value: object, minimum: int) -> bool:
    return (
        isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= minimum
    )


def partition(
    labels: Sequence[int],
    *,
    clients: int,
    scheme: str,
    seed: int,
    alpha: float = 0.5,
    groups: Sequence[str] | None = None,
    min_size: int = 1,
) -> list[list[int]]:
    """Split positions 0..len(labels)-1 among `clients` clients; see the module docstring.

    Returns one sorted list of positions per client (every client non-empty when min_size >= 1).
    `alpha` is used by ``dirichlet`` only, `groups` (one group name per example) by ``group`` only.
    """
    if scheme not in SCHEMES:
        raise DataError(
            f"partition scheme {scheme!r} is unknown — use one of: {', '.join(SCHEMES)}"
        )
    if not _is_whole(clients, 1):
        raise DataError(f"clients must be a whole number >= 1, got {clients!r} — e.g. 10")
    if not _is_whole(min_size, 0):
        raise DataError(f"min_size must be a whole number >= 0, got {min_size!r} — e.g. 1")
    clients, min_size = int(clients), int(min_size)
    y = _as_labels(labels)
    n = len(y)
    if n == 0:
        raise DataError("cannot partition an empty data set — give a data set with examples")
    if clients > n:
        raise DataError(
            f"{clients} clients but only {n} examples — use at most {n} clients, or more data"
        )
    if clients * min_size > n:
        raise DataError(
            f"{clients} clients with at least {min_size} examples each need {clients * min_size} "
            f"examples but there are only {n} — use fewer clients or a smaller min_size"
        )
    rng = np.random.default_rng(seed)

    if scheme == "iid":
        parts = [np.sort(p) for p in np.array_split(rng.permutation(n), clients)]
    elif scheme == "dirichlet":
        parts = _dirichlet(y, clients, alpha, min_size, rng)
    else:
        parts = _by_group(n, clients, groups, rng)

    smallest = min(len(p) for p in parts)
    if smallest < min_size:  # only reachable for 'group' (the other schemes ensure it)
        raise DataError(
            f"scheme {scheme!r} gives a client only {smallest} example(s), fewer than min_size "
            f"{min_size} — use fewer clients or a smaller min_size"
        )
    return [p.tolist() for p in parts]


def _as_labels(labels: Sequence[int]) -> np.ndarray:
    return np.asarray(labels, dtype=np.int64).reshape(-1) if len(labels) else np.empty(0, np.int64)


def _dirichlet(
    y: np.ndarray, clients: int, alpha: float, min_size: int, rng: np.random.Generator
) -> list[np.ndarray]:
    if (
        isinstance(alpha, bool)
        or not isinstance(alpha, numbers.Real)
        or not math.isfinite(alpha)
        or alpha <= 0
    ):
        raise DataError(
            f"dirichlet alpha (data.dirichlet_alpha) must be a number > 0, got {alpha!r} — "
            f"e.g. 0.5 (smaller is more skewed, larger is closer to IID)"
        )
    classes = np.unique(y)
    by_class = [np.flatnonzero(y == c) for c in classes]
    conc = np.full(clients, float(alpha))
    for _ in range(DIRICHLET_ATTEMPTS):
        buckets: list[list[np.ndarray]] = [[] for _ in range(clients)]
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(conc)
            if not np.all(np.isfinite(p)) or p.sum() <= 0:  # pragma: no cover - numerical guard
                p = np.full(clients, 1.0 / clients)
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for k, piece in enumerate(np.split(idx, cuts)):
                buckets[k].append(piece)
        parts = [np.sort(np.concatenate(b)) for b in buckets]
        if min(len(p) for p in parts) >= min_size:
            return parts
    raise DataError(
        f"the dirichlet split (alpha={alpha}) left some client with fewer than {min_size} "
        f"example(s) in all {DIRICHLET_ATTEMPTS} tries — use a larger alpha "
        f"(data.dirichlet_alpha, e.g. 1.0) or fewer clients"
    )


def _by_group(
    n: int, clients: int, groups: Sequence[str] | None, rng: np.random.Generator
) -> list[np.ndarray]:
    if groups is None:
        raise DataError(
            "scheme 'group' needs a group for every example — set data.group_column to the "
            "column that holds them (e.g. movie_name), or use scheme 'iid' or 'dirichlet'"
        )
    if len(groups) != n:
        raise DataError(
            f"scheme 'group' got {len(groups)} group names for {n} examples — give one group "
            f"per example"
        )
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(str(g), []).append(i)
    if len(members) < clients:
        raise DataError(
            f"scheme 'group' needs at least one group per client, but there are {len(members)} "
            f"groups for {clients} clients — use at most {len(members)} clients, or scheme "
            f"'iid' or 'dirichlet'"
        )
    names = sorted(members)  # independent of first-appearance order and of hash seeds
    order = rng.permutation(len(names))
    # Largest first; the stable sort keeps the shuffled order among groups of equal size.
    order = sorted(order.tolist(), key=lambda j: -len(members[names[j]]))
    sizes = np.zeros(clients, dtype=np.int64)
    assigned: list[list[int]] = [[] for _ in range(clients)]
    for j in order:
        k = int(np.argmin(sizes))  # fewest examples; ties -> lowest client index
        assigned[k].extend(members[names[j]])
        sizes[k] += len(members[names[j]])
    return [np.sort(np.asarray(a, dtype=np.int64)) for a in assigned]


def label_counts(
    labels: Sequence[int], parts: Sequence[Sequence[int]], num_labels: int
) -> list[list[int]]:
    """For each part, how many of its examples have each label 0..num_labels-1."""
    y = _as_labels(labels)
    if len(y) and (y.min() < 0 or y.max() >= num_labels):
        raise DataError(
            f"labels must lie in 0..{num_labels - 1}, found {int(y.min())}..{int(y.max())} — "
            f"pass the data set's num_labels"
        )
    out = []
    for p in parts:
        idx = np.asarray(p, dtype=np.int64)
        out.append(np.bincount(y[idx], minlength=num_labels).tolist() if len(idx) else
                   [0] * num_labels)
    return out
