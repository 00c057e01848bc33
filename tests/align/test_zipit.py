"""ZipIt!: greedy feature pairing with the same-model budget, and the zipped layers."""

from __future__ import annotations

import torch

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.spec import chain_spec
from merge_cli.align.zipit import zip_matching
from merge_cli.io import InMemoryCheckpoint
from merge_cli.io.checkpoint import read_state_dict
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task
from tests.align.conftest import REPO

DIGITS = REPO / "recipes" / "tasks" / "digits.py"


def _correlation(pairs: dict[tuple[int, int], float], n: int = 2) -> torch.Tensor:
    c = torch.full((2 * n, 2 * n), 0.1)
    for (i, j), value in pairs.items():
        c[i, j] = c[j, i] = value
    return c.fill_diagonal_(1.0)


def test_budget_zero_pairs_only_across_models():
    # features: a0, a1, b0, b1
    c = _correlation({(0, 3): 0.9, (0, 1): 0.8, (1, 2): 0.7})
    merge, unmerge = zip_matching(c, beta=0.0)
    assert merge.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]
    assert torch.equal(unmerge, (merge > 0).float().T)


def test_same_model_pairs_up_to_the_budget_then_completion():
    c = _correlation({(0, 1): 0.95, (0, 3): 0.9, (2, 3): 0.85, (1, 2): 0.7})
    merge, _ = zip_matching(c, beta=0.5)  # budget: one same-model pair; (a0, a1) takes it
    # (b0, b1) is then refused in the first pass, but nothing else is left: completed after
    assert merge.tolist() == [[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]]
    merge, _ = zip_matching(c, beta=0.0)
    assert merge.tolist() == [[0.5, 0, 0, 0.5], [0, 0.5, 0.5, 0]]


def test_views_average_to_the_zipped_network(digits_task):
    """W* = M_l blockdiag(W_A, W_B) U_{l-1}, with M, U read back from the maps."""
    torch.manual_seed(0)
    models = [digits_task.build_mlp(16, 2) for _ in range(2)]
    states = [m.state_dict() for m in models]
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    spec = chain_spec(checkpoints["a"])
    task = Task(
        TaskSpec(
            model=f"{DIGITS}:build_mlp", data=f"{DIGITS}:data", params={"hidden": 16, "depth": 2}
        )
    )
    aligner = ALIGNERS["zipit"]
    maps = aligner.align(
        checkpoints, "a", spec, aligner.params(beta=1.0), AlignContext(task, print)
    )
    views = {
        n: read_state_dict(PermutedCheckpoint(c, spec, maps[n])) for n, c in checkpoints.items()
    }
    zipped = {k: (views["a"][k] + views["b"][k]) / 2 for k in states[0]}
    m = {
        g.name: torch.cat([maps["a"][g.name].out_matrix, maps["b"][g.name].out_matrix], 1) / 2
        for g in spec.groups
    }
    u = {
        g.name: torch.cat([maps["a"][g.name].in_matrix, maps["b"][g.name].in_matrix], 1).T
        for g in spec.groups
    }
    for merge in m.values():
        assert sorted(set(merge.flatten().tolist())) == [0.0, 0.5]
        assert torch.equal((merge > 0).sum(1), torch.full((16,), 2))
    # first layer: inputs are shared, so M [W_A; W_B]
    w0 = torch.cat([states[0]["layers.0.weight"], states[1]["layers.0.weight"]])
    torch.testing.assert_close(zipped["layers.0.weight"], m["layers.0"] @ w0)
    # middle layer: M blockdiag(W_A, W_B) U
    w2 = torch.block_diag(states[0]["layers.2.weight"], states[1]["layers.2.weight"])
    torch.testing.assert_close(zipped["layers.2.weight"], m["layers.2"] @ w2 @ u["layers.0"])
    # last layer: outputs are averaged, inputs unmerged
    w4 = torch.cat([states[0]["layers.4.weight"], states[1]["layers.4.weight"]], 1) / 2
    torch.testing.assert_close(zipped["layers.4.weight"], w4 @ u["layers.2"])


def test_partial_zip_is_a_multi_head_model(digits_task):
    """Zip the first hidden layer only: shared zipped trunk, per-model heads reading the
    unmerged features, outputs averaged; all groups: the zipped model; none: the ensemble."""
    from merge_cli.align.zipit import partial_zip

    torch.manual_seed(1)
    models = [digits_task.build_mlp(16, 2) for _ in range(2)]
    states = [m.state_dict() for m in models]
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    spec = chain_spec(checkpoints["a"])
    task = Task(
        TaskSpec(
            model=f"{DIGITS}:build_mlp", data=f"{DIGITS}:data", params={"hidden": 16, "depth": 2}
        )
    )
    aligner = ALIGNERS["zipit"]
    maps = aligner.align(checkpoints, "a", spec, aligner.params(), AlignContext(task, print))
    x = torch.randn(5, 64)
    with torch.no_grad():
        ensemble = partial_zip(task, checkpoints, "a", spec, maps, 0)(x)
        torch.testing.assert_close(ensemble, (models[0](x) + models[1](x)) / 2)
        full = partial_zip(task, checkpoints, "a", spec, maps, 2)(x)
        views = [read_state_dict(PermutedCheckpoint(checkpoints[n], spec, maps[n])) for n in "ab"]
        zipped = digits_task.build_mlp(16, 2)
        zipped.load_state_dict({k: (views[0][k] + views[1][k]) / 2 for k in states[0]})
        torch.testing.assert_close(full, zipped(x))
        half = partial_zip(task, checkpoints, "a", spec, maps, 1)(x)
        g = spec.groups[0].name
        merge = torch.cat([maps["a"][g].out_matrix, maps["b"][g].out_matrix], 1) / 2
        w0 = torch.cat([states[0]["layers.0.weight"], states[1]["layers.0.weight"]])
        b0 = torch.cat([states[0]["layers.0.bias"], states[1]["layers.0.bias"]])
        h = torch.relu(x @ (merge @ w0).T + merge @ b0)
        outputs = []
        for m, name in enumerate("ab"):
            s = states[m]
            unmerged = h @ maps[name][g].in_matrix  # U_m h for every sample
            hidden = torch.relu(unmerged @ s["layers.2.weight"].T + s["layers.2.bias"])
            outputs.append(hidden @ s["layers.4.weight"].T + s["layers.4.bias"])
        torch.testing.assert_close(half, (outputs[0] + outputs[1]) / 2)
