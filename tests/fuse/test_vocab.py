"""Models with added tokens: a clear error by default, `fuse.tokenizer_source: base` on request."""

from __future__ import annotations

import pytest
import torch

from merge_cli.errors import PlanError
from tests.fuse.fuse_harness import merge


def _models():
    base = {
        "model.embed_tokens.weight": torch.arange(8.0).reshape(4, 2),
        "lm_head.weight": torch.ones(4, 2),
        "norm.weight": torch.ones(2),
    }
    bigger = {  # two added tokens
        "model.embed_tokens.weight": torch.arange(12.0).reshape(6, 2) + 1,
        "lm_head.weight": torch.full((6, 2), 3.0),
        "norm.weight": torch.full((2,), 2.0),
    }
    smaller = {  # lacks the base's last token
        "model.embed_tokens.weight": torch.arange(6.0).reshape(3, 2) - 1,
        "lm_head.weight": torch.full((3, 2), 5.0),
        "norm.weight": torch.full((2,), 4.0),
    }
    return {"base": base, "big": bigger, "small": smaller}


def test_differing_vocabularies_are_refused_with_a_hint(tmp_path):
    with pytest.raises(PlanError) as error:
        merge(tmp_path, "task_arithmetic", _models())
    message = str(error.value)
    assert "tensor 'model.embed_tokens.weight': shape [6, 2] in model 'big'" in message
    assert "set fuse.tokenizer_source: base" in message


def test_tokenizer_source_base_keeps_the_base_vocabulary(tmp_path):
    out = merge(tmp_path, "task_arithmetic", _models(), extra={"tokenizer_source": "base"})
    embed = torch.arange(8.0).reshape(4, 2)
    # big: its first 4 rows (+1 each); small: 3 rows (-1 each), then the base's row (delta 0)
    expected = embed + 1 + torch.tensor([[-1.0, -1], [-1, -1], [-1, -1], [0, 0]])
    assert torch.equal(out["model.embed_tokens.weight"], expected)
    head = torch.ones(4, 2) + 2 + torch.tensor([[4.0, 4], [4, 4], [4, 4], [0, 0]])
    assert torch.equal(out["lm_head.weight"], head)
    assert out["model.embed_tokens.weight"].shape == (4, 2)
    # chunked the same (rows straddle the model's own and the padded rows)
    chunked = merge(
        tmp_path, "task_arithmetic", _models(), extra={"tokenizer_source": "base"}, chunk_bytes=8
    )
    assert all(torch.equal(out[k], chunked[k]) for k in out)


def test_tokenizer_source_does_not_hide_other_shape_mismatches(tmp_path):
    models = _models()
    models["big"]["norm.weight"] = torch.ones(3)
    with pytest.raises(PlanError, match="tensor 'norm.weight': shape \\[3\\] in model 'big'"):
        merge(tmp_path, "task_arithmetic", models, extra={"tokenizer_source": "base"})
