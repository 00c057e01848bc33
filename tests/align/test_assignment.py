"""Linear assignment helpers, checked against brute force."""

from __future__ import annotations

import itertools

import torch

from merge_cli.align.assignment import (
    assignment_value,
    solve_assignment,
    solve_nested_assignment,
)


def test_solve_assignment_is_the_best_permutation():
    torch.manual_seed(0)
    similarity = torch.randn(5, 5)
    best = max(
        itertools.permutations(range(5)),
        key=lambda p: float(similarity[torch.arange(5), torch.tensor(p)].sum()),
    )
    assert solve_assignment(similarity).tolist() == list(best)


def test_nested_assignment_is_the_best_grouped_permutation():
    """2 KV heads x 2 query heads each: enumerate every admissible head permutation."""
    torch.manual_seed(1)
    for _ in range(5):
        parent, child = torch.randn(2, 2), torch.randn(4, 4)
        best = -float("inf")
        for kv in itertools.permutations(range(2)):
            for inner in itertools.product(itertools.permutations(range(2)), repeat=2):
                q = torch.tensor([kv[j] * 2 + inner[j][i] for j in range(2) for i in range(2)])
                value = assignment_value(parent, torch.tensor(kv)) + assignment_value(child, q)
                best = max(best, value)
        kv_perm, q_perm = solve_nested_assignment(parent, child)
        assert all(
            int(q_perm[2 * j + i]) // 2 == int(kv_perm[j]) for j in range(2) for i in range(2)
        )
        got = assignment_value(parent, kv_perm) + assignment_value(child, q_perm)
        assert abs(got - best) < 1e-9
