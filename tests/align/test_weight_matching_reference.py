"""Weight matching against a direct implementation of Git Re-Basin's algorithm (issue #16).

Ainsworth, Hayase & Srinivasa 2023 ("Git Re-Basin", ICLR), Sec. 3.2 and Algorithm 1:
weight matching maximises ``sum_l <W_a_l, P_l W_b_l P_(l-1)^T>`` by coordinate descent,
one linear assignment problem per permutation with every other permutation fixed, starting
from the identity, visiting the permutations in a random order each sweep, until a sweep
improves nothing. :func:`reference_weight_matching` is written from the paper and the
authors' ``weight_matching.py`` with plain torch and
:func:`scipy.optimize.linear_sum_assignment`, sharing no code with merge-cli. Its
permutation spec (:func:`reference_spec`, after their ``vgg16_permutation_spec`` with
BatchNorm in place of their LayerNorm) lists parameters only: a conv's weight rows and bias,
its BatchNorm's scale and bias, and the next layer's input axis. The running statistics are
no parameters; they are permuted along, but never enter the cost.

A BatchNorm CNN pair (four conv blocks 32-32-64-64, trained on digits from seeds 0 and 1)
is merged by a recipe (``align: weight_matching``, ``fuse: linear`` 0.5/0.5, without and
with ``repair``, which resets the BatchNorm statistics) and by the reference. Both draw the
order of each sweep from ``torch.randperm`` with one generator seeded by ``seed`` (merge-cli's
documented parameter), so the comparison is exact: same permutations, same objective, same
midpoint. Before merge-cli left the running statistics out of its cost it found other,
worse permutations (the "statistics in the cost" rows reproduce that cost).

``PYTHONPATH=. pytest tests/align/test_weight_matching_reference.py -s`` prints the table of
docs/results-alignment.md.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from scipy.optimize import linear_sum_assignment
from torch import nn

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.fx_spec import derive_spec
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.spec import PermutationSpec
from merge_cli.io.checkpoint import InMemoryCheckpoint, read_state_dict
from merge_cli.task import load_module
from tests.align.conftest import MODELS_FILE, REPO
from tests.conftest import Cli, load_safetensors_dir, single_thread

#: Permutation name -> the (parameter, axis) pairs it permutes.
RefSpec = dict[str, list[tuple[str, int]]]
State = dict[str, torch.Tensor]

MODELS = load_module(MODELS_FILE)
DIGITS = load_module(REPO / "recipes" / "tasks" / "digits.py")
TRAIN_SEEDS = (0, 1)
EPOCHS, LR = 10, 3e-3
#: Sweep-order seeds of the summary rows; the recipe runs with the first (the default, 0).
ORDER_SEEDS = (0, 1, 2, 3, 4)
REFERENCE = f"reference, order seed {ORDER_SEEDS[0]}"
RECIPE = f"merge-cli recipe, order seed {ORDER_SEEDS[0]}"


# ---------------------------------------------------------------------------------------
# The reference: torch and scipy only


def reference_spec(model: nn.Sequential) -> tuple[RefSpec, dict[str, list[str]]]:
    """Git Re-Basin's spec of a conv/BatchNorm chain, and the running statistics that
    follow each permutation (permuted with it, but not part of the objective)."""
    spec: RefSpec = {}
    statistics: dict[str, list[str]] = {}
    current = None
    for name, module in model.named_children():
        if isinstance(module, nn.Conv2d | nn.Linear):
            if current is not None:
                spec[current].append((f"{name}.weight", 1))
            if isinstance(module, nn.Conv2d):
                current = f"P_{name}"
                spec[current] = [(f"{name}.weight", 0), (f"{name}.bias", 0)]
                statistics[current] = []
        elif isinstance(module, nn.BatchNorm2d) and current is not None:
            spec[current] += [(f"{name}.weight", 0), (f"{name}.bias", 0)]
            statistics[current] += [f"{name}.running_mean", f"{name}.running_var"]
    return spec, statistics


def permuted(
    spec: RefSpec,
    perms: dict[str, torch.Tensor],
    key: str,
    tensor: torch.Tensor,
    except_axis: int | None = None,
) -> torch.Tensor:
    """``tensor`` (parameter ``key`` of model b) under every permutation but ``except_axis``'s
    (their ``get_permuted_param``)."""
    for name, axes in spec.items():
        for other, axis in axes:
            if other == key and axis != except_axis:
                tensor = tensor.index_select(axis, perms[name])
    return tensor


def reference_weight_matching(
    spec: RefSpec, params_a: State, params_b: State, seed: int, max_iter: int = 100
) -> dict[str, torch.Tensor]:
    """Git Re-Basin's weight matching: ``perm[name][i]`` is b's unit that goes to a's ``i``."""
    sizes = {name: params_a[axes[0][0]].shape[axes[0][1]] for name, axes in spec.items()}
    perms = {name: torch.arange(size) for name, size in sizes.items()}
    names = list(spec)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(max_iter):
        progress = False
        for index in torch.randperm(len(names), generator=generator).tolist():
            name, size = names[index], sizes[names[index]]
            similarity = torch.zeros(size, size, dtype=torch.float64)
            for key, axis in spec[name]:
                w_a = params_a[key].double().movedim(axis, 0).reshape(size, -1)
                w_b = permuted(spec, perms, key, params_b[key], except_axis=axis)
                similarity += w_a @ w_b.double().movedim(axis, 0).reshape(size, -1).T
            _, columns = linear_sum_assignment(similarity.numpy(), maximize=True)
            new = torch.from_numpy(columns)
            rows = torch.arange(size)
            old_value = float(similarity[rows, perms[name]].sum())
            progress = progress or float(similarity[rows, new].sum()) > old_value + 1e-12
            perms[name] = new
        if not progress:
            break
    return perms


def permute_state(
    spec: RefSpec, statistics: dict[str, list[str]], perms: dict[str, torch.Tensor], state: State
) -> State:
    out = dict(state)
    for key in spec_keys(spec):
        out[key] = permuted(spec, perms, key, state[key])
    for name, keys in statistics.items():
        for key in keys:
            out[key] = state[key][perms[name]]
    return out


def spec_keys(spec: RefSpec) -> set[str]:
    return {k for axes in spec.values() for k, _ in axes}


def objective(spec: RefSpec, params_a: State, params_b: State) -> float:
    """The weight-matching objective ``sum <W_a, W_b>`` over the spec's parameters."""
    return sum(float((params_a[k].double() * params_b[k].double()).sum()) for k in spec_keys(spec))


def midpoint_objective(spec: RefSpec, a: State, merged: State) -> float:
    """The objective of the aligned b inside the midpoint ``merged = (a + b) / 2``."""
    return objective(spec, a, {k: 2 * merged[k].double() - a[k].double() for k in spec_keys(spec)})


def midpoint(a: State, b: State) -> State:
    return {k: (a[k] + b[k]) / 2 if a[k].is_floating_point() else a[k] for k in a}


@torch.no_grad()
def reset_batchnorm(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """Running statistics re-estimated on ``batches`` (a plain average, momentum None)."""
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.reset_running_stats()
            module.momentum = None
    model.train()
    for inputs, _ in batches:
        model(inputs)
    model.eval()


@torch.no_grad()
def accuracy(state: State, reset: bool = False) -> float:
    """Test-split accuracy of a ``build_bn_cnn4`` with weights ``state``."""
    model = MODELS.build_bn_cnn4()
    model.load_state_dict(state)
    if reset:
        reset_batchnorm(model, MODELS.image_data("train"))
    model.eval()
    images, labels = DIGITS.split_arrays("test")
    return float((model(images.reshape(-1, 1, 8, 8)).argmax(-1) == labels).float().mean())


# ---------------------------------------------------------------------------------------
# The pair, the recipe runs, the comparison


def train_pair() -> list[State]:
    states = []
    for seed in TRAIN_SEEDS:
        torch.manual_seed(seed)
        model = DIGITS.train(
            MODELS.build_bn_cnn4(), MODELS.image_data("train"), epochs=EPOCHS, lr=LR, seed=seed
        )
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    return states


def run_recipe(files: list[Path], out: Path, repair: bool, seed: int) -> State:
    """The fused output of ``align: weight_matching`` + ``linear`` 0.5/0.5 through the CLI."""
    recipe = {
        "models": {"a": str(files[0]), "b": str(files[1])},
        "task": {"model": f"{MODELS_FILE}:build_bn_cnn4", "data": f"{MODELS_FILE}:image_data"},
        "align": {
            "method": "weight_matching",
            "reference": "a",
            "spec": "auto",
            "repair": repair,
            "params": {"seed": seed},
        },
        "fuse": {"method": "linear", "models": {"a": {"weight": 0.5}, "b": {"weight": 0.5}}},
        "save": {"path": str(out), "dtype": "float32"},
    }
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(recipe))
    code, _, stderr = Cli()("run", path)
    assert code == 0, stderr
    return load_safetensors_dir(out)


def api_midpoint(states: list[State], spec: PermutationSpec, seed: int) -> State:
    """Midpoint of a and b aligned by merge-cli's weight matching under ``spec``."""
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    aligner = ALIGNERS["weight_matching"]
    params = aligner.params.model_validate({"seed": seed})
    maps = aligner.align(checkpoints, "a", spec, params, AlignContext(None, lambda _text: None))
    return midpoint(
        states[0], read_state_dict(PermutedCheckpoint(checkpoints["b"], spec, maps["b"]))
    )


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run several times faster on one thread than on a loaded shared CPU."""
    with single_thread():
        yield


Row = tuple[float, float | None, float | None]


def measure(a: State, merged: list[State], spec: RefSpec | None = None) -> Row:
    """Mean over ``merged`` midpoints of: test accuracy, test accuracy after the BatchNorm
    reset, and (with ``spec``) the weight-matching objective of the aligned b."""
    plain = sum(accuracy(m) for m in merged) / len(merged)
    reset = sum(accuracy(m, reset=True) for m in merged) / len(merged)
    if spec is None:
        return plain, reset, None
    return plain, reset, sum(midpoint_objective(spec, a, m) for m in merged) / len(merged)


def table(rows: dict[str, Row]) -> str:
    lines = ["| midpoint | test acc | after BN reset | objective |", "|---|---:|---:|---:|"]
    for label, values in rows.items():
        cells = [f"{v:.3f}" if v is not None else "" for v in values[:2]]
        cells.append(f"{values[2]:.2f}" if values[2] is not None else "")
        lines.append(f"| {label} | {' | '.join(cells)} |")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict:
    """Trained pair, reference and recipe midpoints; prints the table of the docs."""
    states = train_pair()
    a, b = states
    spec, statistics = reference_spec(MODELS.build_bn_cnn4())
    directory = tmp_path_factory.mktemp("bn_cnn4")
    files = [directory / f"{name}.safetensors" for name in "ab"]
    for state, file in zip(states, files, strict=True):
        save_file({k: v.contiguous() for k, v in state.items()}, str(file))
    recipe = run_recipe(files, directory / "merged", repair=False, seed=ORDER_SEEDS[0])
    repaired = run_recipe(files, directory / "repaired", repair=True, seed=ORDER_SEEDS[0])

    # Every sweep order: the reference, merge-cli (the recipe's spec, through the API) and
    # merge-cli with the running statistics in its cost (what it computed before the fix)
    auto = derive_spec(MODELS.build_bn_cnn4(), MODELS.image_data("train")[0][0])
    with_statistics = PermutationSpec(
        tuple(
            replace(g, axes=tuple(replace(x, statistic=False) for x in g.axes)) for g in auto.groups
        )
    )
    orders: dict[str, list[State]] = {"reference": [], "merge-cli": [], "statistics": []}
    for order in ORDER_SEEDS:
        perms = reference_weight_matching(spec, a, b, order)
        orders["reference"].append(midpoint(a, permute_state(spec, statistics, perms, b)))
        orders["merge-cli"].append(api_midpoint(states, auto, order))
        orders["statistics"].append(api_midpoint(states, with_statistics, order))

    first = f"order seed {ORDER_SEEDS[0]}"
    mean = f"mean of order seeds {ORDER_SEEDS[0]}-{ORDER_SEEDS[-1]}"
    rows = {
        "endpoint a": (accuracy(a), None, None),
        "endpoint b": (accuracy(b), None, None),
        "naive average": measure(a, [midpoint(a, b)]),
        REFERENCE: measure(a, orders["reference"][:1], spec),
        RECIPE: (accuracy(recipe), accuracy(repaired), midpoint_objective(spec, a, recipe)),
        f"merge-cli, statistics in the cost, {first}": measure(a, orders["statistics"][:1], spec),
        f"reference, {mean}": measure(a, orders["reference"], spec),
        f"merge-cli, {mean}": measure(a, orders["merge-cli"], spec),
        f"merge-cli, statistics in the cost, {mean}": measure(a, orders["statistics"], spec),
    }
    print("\n" + table(rows))
    return {
        "a": a,
        "spec": spec,
        "reference": orders["reference"][0],
        "recipe": recipe,
        "rows": rows,
        "orders": orders,
    }


def test_endpoints_are_trained(results):
    assert results["rows"]["endpoint a"][0] > 0.95
    assert results["rows"]["endpoint b"][0] > 0.95


def test_recipe_finds_the_reference_permutations(results):
    """Same sweep order, same permutations: the fused weights are the reference midpoint's,
    and the weight-matching objective is the reference's."""
    recipe, reference, spec, a = (results[k] for k in ("recipe", "reference", "spec", "a"))
    for name, tensor in reference.items():
        torch.testing.assert_close(recipe[name], tensor, atol=1e-5, rtol=1e-5)
    ours = midpoint_objective(spec, a, recipe)
    assert ours >= midpoint_objective(spec, a, reference) - 1e-3


def test_midpoint_reaches_the_reference_accuracy(results):
    """Within 2 points of the reference's midpoint, before and after the BatchNorm reset."""
    ours, theirs = results["rows"][RECIPE], results["rows"][REFERENCE]
    assert ours[0] >= theirs[0] - 0.02
    assert ours[1] >= theirs[1] - 0.02


def test_every_sweep_order_finds_the_reference_permutations(results):
    """Over several sweep orders merge-cli's midpoints are the reference's."""
    for ours, theirs in zip(
        results["orders"]["merge-cli"], results["orders"]["reference"], strict=True
    ):
        for name, tensor in theirs.items():
            torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=1e-5)


def test_running_statistics_do_not_enter_the_cost():
    """Weight matching finds the same permutations whatever b's running statistics are:
    they are permuted along (the aligned view still reorders them) but are not weights."""
    states = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        states.append(MODELS.randomize_norms(MODELS.build_bn_cnn4(), seed).state_dict())
    spec = derive_spec(MODELS.build_bn_cnn4(), torch.randn(2, 1, 8, 8))
    scrambled = dict(states[1])
    generator = torch.Generator().manual_seed(2)
    for name, tensor in states[1].items():
        if name.endswith(("running_mean", "running_var")):
            scrambled[name] = 100 * torch.rand(tensor.shape, generator=generator)
    aligner = ALIGNERS["weight_matching"]
    params = aligner.params.model_validate({})
    perms = []
    for b in (states[1], scrambled):
        checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(b)}
        maps = aligner.align(checkpoints, "a", spec, params, AlignContext(None, lambda _t: None))
        perms.append({g: m.permutation for g, m in maps["b"].items()})
        view = read_state_dict(PermutedCheckpoint(checkpoints["b"], spec, maps["b"]))
        group = spec.groups[0]
        torch.testing.assert_close(
            view["1.running_mean"], b["1.running_mean"][perms[-1][group.name]]
        )
    assert perms[0].keys() == perms[1].keys()
    assert all(torch.equal(perms[0][g], perms[1][g]) for g in perms[0])
