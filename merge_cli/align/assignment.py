"""Linear assignment helpers shared by the hard-matching aligners.

Both weight matching and activation matching end in the same problem: given a similarity
``S[i, j]`` between reference unit ``i`` and model unit ``j``, find the permutation that
maximises ``sum_i S[i, perm[i]]`` (solved exactly with
:func:`scipy.optimize.linear_sum_assignment`). Grouped-query attention adds a two-level
version: KV heads are matched, and inside each matched pair of KV heads its query heads.
"""

from __future__ import annotations

import numpy as np
import torch


def solve_assignment(similarity: torch.Tensor) -> torch.Tensor:
    """The permutation maximising ``sum_i similarity[i, perm[i]]``."""
    # Imported here: scipy.optimize takes a third of a second, paid by every command otherwise.
    from scipy.optimize import linear_sum_assignment

    cost = similarity.cpu().to(torch.float64, copy=True).neg_()  # one float64 copy, no more
    rows, cols = linear_sum_assignment(cost.numpy())
    perm = np.empty(len(rows), dtype=np.int64)
    perm[rows] = cols
    return torch.from_numpy(perm)


def solve_nested_assignment(
    parent_similarity: torch.Tensor, child_similarity: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Match parents (KV heads) and, within matched parents, their children (query heads).

    The value of pairing parent ``j`` with parent ``k`` is ``parent_similarity[j, k]`` plus
    the best assignment between their blocks of children; the outer assignment then picks
    the parents, and the children follow. Returns (parent permutation, child permutation),
    the child permutation over all children, consistent with the parent's.
    """
    parents = parent_similarity.shape[0]
    per = child_similarity.shape[0] // parents
    blocks = child_similarity.double().reshape(parents, per, parents, per).permute(0, 2, 1, 3)
    value = parent_similarity.double().clone()
    inner = torch.empty(parents, parents, per, dtype=torch.long)
    for j in range(parents):
        for k in range(parents):
            perm = solve_assignment(blocks[j, k])
            inner[j, k] = perm
            value[j, k] += blocks[j, k][torch.arange(per), perm].sum()
    parent_perm = solve_assignment(value)
    child_perm = torch.cat(
        [int(parent_perm[j]) * per + inner[j, parent_perm[j]] for j in range(parents)]
    )
    return parent_perm, child_perm


def assignment_value(similarity: torch.Tensor, perm: torch.Tensor) -> float:
    return float(similarity.double()[torch.arange(len(perm)), perm].sum())
