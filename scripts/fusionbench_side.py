"""FusionBench's side of scripts/compare_fusionbench.py: run under a Python that has
``fusion-bench`` installed (not merge-cli's environment).

    python scripts/fusionbench_side.py DIR

reads ``DIR/inputs.pt`` ({"base": state dict, "tasks": [state dicts], "settings": {...}}),
merges with FusionBench's own functions and writes ``DIR/fusionbench.pt`` ({method: state
dict}). Only FusionBench's library functions are called; what the comparison needs beyond
them (adding the base back, scaling, the consensus count over FusionBench's TALL masks) is
one line each here and named in the output.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
from fusion_bench.method.singular_value_calibration.utils import (
    subspace_consistency_spectral_calibration_accelerated,
)
from fusion_bench.method.tall_mask.utils import generate_task_masks
from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
    compute_and_sum_svd_mem_reduction,
)
from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging
from fusion_bench.method.wudi.wudi import wudi_merging


def add(base, update, scale=1.0):
    return {k: base[k] + scale * update[k] for k in base}


def flat(state):
    return torch.cat([state[k].reshape(-1) for k in sorted(state)])


def unflat(vector, like):
    out, start = {}, 0
    for k in sorted(like):
        n = like[k].numel()
        out[k] = vector[start : start + n].reshape(like[k].shape)
        start += n
    return out


def consensus(base, tasks, merged_tv, lam, k, scale):
    """FusionBench's TALL masks (generate_task_masks), kept where at least k tasks agree."""
    tvs = torch.stack([flat(t) - flat(base) for t in tasks])
    masks = generate_task_masks(
        tvs, torch.stack([flat(t) for t in tasks]), flat(base), tv=merged_tv, tall_mask_lambda=lam
    )
    keep = masks.float().sum(0) >= k
    return unflat(flat(base) + scale * merged_tv * keep, base)


def main(directory: Path) -> None:
    inputs = torch.load(directory / "inputs.pt")
    base, tasks, s = inputs["base"], inputs["tasks"], inputs["settings"]
    tvs = [{k: t[k] - base[k] for k in base} for t in tasks]
    out = {}
    out["tsv"] = add(base, compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu"))
    out["iso_c"] = add(base, iso_c(tvs, accelerator="cpu"), s["iso_alpha"])
    out["iso_cts"] = add(
        base, iso_cts(tvs, s["common_space_fraction"], accelerator="cpu"), s["iso_alpha"]
    )
    summed = flat(tvs[0])
    for tv in tvs[1:]:
        summed = summed + flat(tv)
    out["consensus_task_arithmetic"] = consensus(
        base, tasks, summed, s["tall_mask_lambda"], s["k"], s["ta_lambda"]
    )
    ta = add(base, unflat(summed, base), s["ta_lambda"])
    out["task_arithmetic_svc"] = {
        k: subspace_consistency_spectral_calibration_accelerated(
            base[k], [t[k] for t in tasks], ta[k], alpha=s["svc_alpha"], accelerator="cpu"
        )
        if base[k].dim() == 2
        else ta[k]
        for k in base
    }
    # TIES over the one-tensor state dict (FusionBench trims over the whole flattened model)
    one = s["ties_tensor"]
    single = [{one: t[one]} for t in tasks]
    ties_tv = ties_merging(
        torch.stack([flat(t) - base[one].reshape(-1) for t in single]),
        reset_thresh=s["ties_k"],
        merge_func="mean",
    )
    out["consensus_ties"] = consensus(
        {one: base[one]}, single, ties_tv, s["tall_mask_lambda"], s["k"], 1.0
    )
    wudi = wudi_merging(tvs, accelerator="cpu", iter_num=s["wudi_iter"])
    out["wudi"] = add(base, {k: v.detach() for k, v in wudi.items()})
    torch.save(out, directory / "fusionbench.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
