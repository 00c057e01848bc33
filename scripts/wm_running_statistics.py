"""Weight matching with and without BatchNorm running statistics in its cost.

Git Re-Basin's weight matching (Ainsworth, Hayase & Srinivasa 2023) maximises the inner
product of the two models' *weights*; merge-cli leaves running statistics out of the cost
(:attr:`merge_cli.align.spec.AxisRef.statistic`), as it did not before. This script measures
both costs on the two BatchNorm pairs of the digits experiments: the BN-MLP of
``scripts/align_digits.py`` (3 x 256, 6 epochs, seeds 1 and 2) and the two-conv CNN of
``tests/align/test_cnn_repair.py`` (``build_cnn``, 10 epochs, lr 3e-3, seeds 1 and 2).
For every sweep-order seed it aligns b to a, averages them, and reports the midpoint's test
loss and accuracy, as it is and after REPAIR (here: resetting the BatchNorm statistics).
The four-block CNN of issue #16 is compared with the paper's algorithm in
tests/align/test_weight_matching_reference.py.

    python scripts/wm_running_statistics.py [--orders 10]
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from merge_cli.align import ALIGNERS
from merge_cli.align.context import AlignContext
from merge_cli.align.permuted import PermutedCheckpoint
from merge_cli.align.repair import repair_state_dict
from merge_cli.align.spec import PermutationSpec, chain_spec
from merge_cli.connect.interpolate import interpolate_state_dicts
from merge_cli.io.checkpoint import InMemoryCheckpoint, read_state_dict
from merge_cli.recipe import TaskSpec
from merge_cli.task import Task, load_module

REPO = Path(__file__).resolve().parents[1]
DIGITS_FILE = REPO / "recipes" / "tasks" / "digits.py"
DIGITS = load_module(DIGITS_FILE)
ALIGN_DIGITS = load_module(REPO / "scripts" / "align_digits.py")

State = dict[str, torch.Tensor]
#: (midpoint test loss, accuracy, loss after REPAIR, accuracy after REPAIR)
Metrics = tuple[float, float, float, float]


def cnn_pair() -> list[State]:
    """The BatchNorm CNN pair of tests/align/test_cnn_repair.py (trained on one thread, as
    there, so that the same weights come out)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    states = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        model = DIGITS.train(
            DIGITS.build_cnn(), DIGITS.data("train"), epochs=10, lr=3e-3, seed=seed
        )
        states.append({k: v.detach().clone() for k, v in model.state_dict().items()})
    torch.set_num_threads(threads)
    return states


@torch.no_grad()
def scores(build: nn.Module, state: State) -> tuple[float, float]:
    build.load_state_dict(state)
    build.eval()
    images, labels = DIGITS.split_arrays("test")
    logits = build(images)
    accuracy = (logits.argmax(-1) == labels).float().mean()
    return float(F.cross_entropy(logits, labels)), float(accuracy)


def with_statistics(spec: PermutationSpec) -> PermutationSpec:
    """``spec`` with its running statistics treated as weights (in weight matching's cost)."""
    return replace(
        spec,
        groups=tuple(
            replace(g, axes=tuple(replace(a, statistic=False) for a in g.axes)) for g in spec.groups
        ),
    )


def midpoints(task: Task, states: list[State], spec: PermutationSpec, order: int) -> Metrics:
    """Align b to a with weight matching under ``spec`` (sweep order ``order``), average,
    and score the midpoint before and after REPAIR."""
    checkpoints = {"a": InMemoryCheckpoint(states[0]), "b": InMemoryCheckpoint(states[1])}
    aligner = ALIGNERS["weight_matching"]
    params = aligner.params.model_validate({"seed": order})
    maps = aligner.align(checkpoints, "a", spec, params, AlignContext(task, lambda _t: None))
    b = PermutedCheckpoint(checkpoints["b"], spec, maps["b"])
    merged = interpolate_state_dicts(states[0], read_state_dict(b), 0.5)
    repaired = repair_state_dict(task, spec, merged, [checkpoints["a"], b], [1.0, 1.0])
    return (
        *scores(task.build_model(), merged),
        *scores(task.build_model(), repaired),
    )


def rows(orders: int) -> list[tuple[str, str, Metrics, Metrics]]:
    """(network, cost, order seed 0, mean over ``orders`` seeds) for both pairs and costs."""
    pairs = {
        "BN-MLP": (ALIGN_DIGITS.task(True), ALIGN_DIGITS.train_pair(True, epochs=6)),
        "BN-CNN (2 conv)": (
            Task(TaskSpec(model=f"{DIGITS_FILE}:build_cnn", data=f"{DIGITS_FILE}:data")),
            cnn_pair(),
        ),
    }
    out = []
    for network, (task, states) in pairs.items():
        order = [name for name, _ in task.build_model().named_modules()]
        spec = chain_spec(InMemoryCheckpoint(states[0]), order)
        for cost, variant in (("weights (now)", spec), ("+ statistics", with_statistics(spec))):
            runs = [midpoints(task, states, variant, seed) for seed in range(orders)]
            mean = tuple(sum(r[i] for r in runs) / len(runs) for i in range(4))
            out.append((network, cost, runs[0], mean))
    return out


def table(results: list[tuple[str, str, Metrics, Metrics]], orders: int) -> str:
    lines = [
        "| network | cost | seed 0: loss / acc | + REPAIR | "
        f"mean of {orders} orders: loss / acc | + REPAIR |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for network, cost, first, mean in results:
        cells = [f"{m[0]:.3f} / {m[1]:.3f} | {m[2]:.3f} / {m[3]:.3f}" for m in (first, mean)]
        lines.append(f"| {network} | {cost} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--orders", type=int, default=10, help="sweep-order seeds 0..N-1")
    args = parser.parse_args()
    print(table(rows(args.orders), args.orders))


if __name__ == "__main__":
    main()
