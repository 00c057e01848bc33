"""Reproduce docs/results-ensembles.md: ensembles and distillation on digits, over seeds.

For each seed: train the eight digits members (recipes/ensemble/members.py), run the
ensemble and distillation recipes through merge-cli, and score everything on the test split.

    python scripts/ensemble_results.py --seeds 0 1 2 3 4
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from merge_cli.task import load_module

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import merge_cli  # noqa: E402
from merge_cli.config import recipe_from_dict  # noqa: E402
from merge_cli.fuse.ensembles.ensemble import (  # noqa: E402
    fit_simplex_weights,
    member_probabilities,
)
from merge_cli.pipeline import run  # noqa: E402
from merge_cli.task.ensemble import Ensemble  # noqa: E402

STUDENT = {"model": "recipes/tasks/digits.py:build_mlp", "params": {"hidden": 32, "depth": 2}}


def members_module():
    return load_module(REPO / "recipes" / "ensemble" / "members.py")


@torch.no_grad()
def nll(model: torch.nn.Module, batches: list) -> float:
    total = sum(
        float(torch.nn.functional.cross_entropy(model(x), y, reduction="sum")) for x, y in batches
    )
    return total / sum(len(y) for _, y in batches)


def run_recipe(name: str, files: dict[str, Path], out: Path, seed: int) -> Path:
    raw = yaml.safe_load((REPO / "recipes" / "ensemble" / name).read_text())
    for member, path in files.items():
        raw["models"][member]["path"] = str(path)
    raw["save"]["path"] = str(out)
    raw["fuse"]["seed"] = seed
    return run(recipe_from_dict(raw)).output


def one_seed(seed: int, scratch: Path) -> dict[str, float]:
    members_code = members_module()
    digits = members_code._digits()
    test = digits.data("test")
    started = time.perf_counter()
    files = members_code.save_members(scratch / "members", seed)
    ensemble = merge_cli.load(run_recipe("digits_ensemble.yaml", files, scratch / "ens", seed))
    student_dir = run_recipe("digits_distill.yaml", files, scratch / "student", seed)
    seconds = time.perf_counter() - started
    members = dict(ensemble.members)
    row: dict[str, float] = {"seed": seed}
    row["best_member"] = max(digits.accuracy(m, test) for m in members.values())
    row["mean_member"] = sum(digits.accuracy(m, test) for m in members.values()) / len(members)
    for rule in ("mean_logits", "mean_probs", "vote"):
        row[rule] = digits.accuracy(Ensemble(members, rule), test)
    row["weighted_selection"] = digits.accuracy(ensemble, test)
    probabilities, targets = member_probabilities(
        list(members.values()), digits.data("val"), "cross_entropy"
    )
    nll_weights, _ = fit_simplex_weights(probabilities[:, torch.arange(len(targets)), targets])
    row["weighted_nll"] = digits.accuracy(Ensemble(members, "weighted", nll_weights), test)
    row["nll_mean_probs"] = nll(Ensemble(members, "mean_probs"), test)
    row["nll_weighted_selection"] = nll(ensemble, test)
    row["nll_weighted_nll"] = nll(Ensemble(members, "weighted", nll_weights), test)
    student = merge_cli.load(student_dir, task=STUDENT)
    row["student"] = digits.accuracy(student, test)
    row["recovered"] = (row["student"] - row["best_member"]) / (
        row["mean_probs"] - row["best_member"]
    )
    # Reference, not a merge-cli method: the student's shape and init trained on the pooled
    # labels of all shards (what the members' owners could do if they shared their labels).
    pooled = digits.build_mlp(hidden=32, depth=2)
    states = [members[n].state_dict() for n in ("s1", "s4", "s7")]
    pooled.load_state_dict({k: sum(s[k] for s in states) / 3 for k in states[0]})
    digits.train(pooled, digits.data("train"), epochs=40, lr=1e-3, seed=seed)
    row["pooled_labels"] = digits.accuracy(pooled, test)
    row["seconds"] = seconds
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    args = parser.parse_args()
    torch.set_num_threads(1)  # tiny MLPs: one thread is fastest
    os.chdir(REPO)  # the recipes' task paths are relative to the repository
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="merge-cli-ensembles-") as scratch:
            row = one_seed(seed, Path(scratch))
        print(json.dumps({k: round(v, 4) for k, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
