"""Relative error of extracted LoRA adapters against their rank, on real fine-tunes.

The digits fine-tunes of scripts/digits_task_vectors.py (a pre-trained MLP 64 → 128 → 128 →
10 on scikit-learn's handwritten digits, fine-tuned on one group of digits each): for each
rank, ``merge-cli extract-lora`` (merge_cli.fuse.adapters.extract) writes the adapter of the
pre-trained model that approximates the fine-tune, which is applied back on read
(``models.NAME.lora``, merge_cli.io.adapters) and compared with the fine-tune:

* relative error of the task vector, ``‖Δ − B·A‖ / ‖Δ‖`` over all weight matrices together,
  and the worst single matrix;
* relative error of the logits on the test images, ``‖f_adapter − f_fine-tune‖ / ‖f_fine-tune‖``;
* test accuracy on the fine-tune's own digit group and on all digits.

    python scripts/lora_rank_table.py [--ranks 1 2 4 8 16 32 64 128]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path
from typing import Any

import torch

from merge_cli.task import load_module

REPO = Path(__file__).resolve().parents[1]
RANKS = (1, 2, 4, 8, 16, 32, 64, 128)


def rank_rows(workdir: Path, ranks: tuple[int, ...] = RANKS, group: str = "0-3") -> list[dict]:
    """Train the digits models in ``workdir`` and measure one fine-tune's adapters per rank."""
    from merge_cli.fuse.adapters.extract import ExtractOptions, extract_lora
    from merge_cli.io.adapters import open_model
    from merge_cli.io.checkpoint import read_state_dict
    from merge_cli.io.resolve import open_checkpoint

    experiment = load_module(REPO / "scripts" / "digits_task_vectors.py")
    digits = experiment._digits()
    with experiment._one_thread():
        paths = experiment._train_models(workdir)
    images, labels = digits.split_arrays("test")
    classes = torch.tensor(experiment.GROUPS[group])
    in_group = torch.isin(labels, classes)
    fine = read_state_dict(open_checkpoint(str(paths[group])))
    pre = read_state_dict(open_checkpoint(str(paths["pretrained"])))

    def evaluate(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, float, float]:
        model = digits.build_mlp(**experiment.ARCH)
        model.load_state_dict(state)
        with torch.no_grad():
            logits = model.eval()(images)
        right = logits.argmax(-1) == labels
        return logits, float(right[in_group].float().mean()), float(right.float().mean())

    fine_logits, fine_group, fine_all = evaluate(fine)
    _, pre_group, pre_all = evaluate(pre)
    rows: list[dict[str, Any]] = [
        {"rank": "pre-trained", "group": pre_group, "all": pre_all},
    ]
    for rank in ranks:
        out = workdir / f"adapter-r{rank}"
        options = ExtractOptions(rank=rank, overwrite=True)
        reports = extract_lora(
            open_checkpoint(str(paths[group])),
            open_checkpoint(str(paths["pretrained"])),
            out,
            options,
        )
        state = read_state_dict(open_model(str(paths["pretrained"]), str(out)))
        matrices = [n for n in fine if fine[n].dim() == 2]
        error = sum(float((state[n] - fine[n]).norm() ** 2) for n in matrices)
        total = sum(float((fine[n] - pre[n]).norm() ** 2) for n in matrices)
        logits, accuracy_group, accuracy_all = evaluate(state)
        rows.append(
            {
                "rank": rank,
                "ranks": {r.name: r.rank for r in reports if r.kind == "lora"},
                "task_vector": (error / total) ** 0.5,
                "worst_matrix": max(r.relative_error for r in reports if r.kind == "lora"),
                "logits": float((logits - fine_logits).norm() / fine_logits.norm()),
                "group": accuracy_group,
                "all": accuracy_all,
                "parameters": sum(
                    t.numel() for n, t in load_adapter_weights(out).items() if ".lora_" in n
                ),
            }
        )
    rows.append({"rank": "fine-tuned", "group": fine_group, "all": fine_all})
    return rows


def load_adapter_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(directory / "adapter_model.safetensors"))


def markdown_table(rows: list[dict]) -> str:
    lines = [
        "| rank (per matrix: layers.0, .2, .4) | LoRA parameters | task vector rel. error "
        "| worst matrix | logits rel. error | accuracy, digits 0-3 | accuracy, all digits |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "task_vector" not in row:
            lines.append(f"| {row['rank']} | | | | | {row['group']:.3f} | {row['all']:.3f} |")
            continue
        per = ", ".join(str(r) for r in row["ranks"].values())
        lines.append(
            f"| {row['rank']} ({per}) | {row['parameters']} | {row['task_vector']:.2e} "
            f"| {row['worst_matrix']:.2e} | {row['logits']:.2e} | {row['group']:.3f} "
            f"| {row['all']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=list(RANKS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        rows = rank_rows(Path(workdir), tuple(args.ranks))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
