"""How pipeline stages split the layers and a step's rows (pure functions every stage runs)."""

from __future__ import annotations

import pytest
import torch

from strata.distributed.pipeline import PPMissingLayer, on_other_stage, split_rows, stage_layer_range


def test_layers_split_evenly_with_the_remainder_first():
    assert [stage_layer_range(32, r, 3) for r in range(3)] == [(0, 11), (11, 22), (22, 32)]
    assert [stage_layer_range(5, r, 2) for r in range(2)] == [(0, 3), (3, 5)]
    assert stage_layer_range(4, 0, 1) == (0, 4)
    with pytest.raises(ValueError, match="pipeline_parallel_size \\(3\\) is more than the model's 2 layers"):
        stage_layer_range(2, 0, 3)


@pytest.mark.parametrize("counts, num", [
    ([1] * 8, 2), ([100, 1, 1, 1], 2), ([1, 1, 1, 100], 2), ([5], 3), ([1, 1, 1], 3),
    ([10] * 5, 4), ([37, 1, 1, 16, 1], 2), ([3, 9, 2, 7, 7, 1], 3)])
def test_rows_split_into_contiguous_nonempty_micro_batches(counts, num):
    parts = split_rows(counts, num)
    assert parts[0][0] == 0 and parts[-1][1] == len(counts)
    assert all(a < b for a, b in parts) and all(b == c for (_, b), (c, _) in zip(parts, parts[1:]))
    assert len(parts) == min(num, len(counts))


def test_balanced_by_tokens():
    assert split_rows([1] * 8, 2) == [(0, 4), (4, 8)]
    assert split_rows([10, 10, 10, 10, 10], 4) == [(0, 2), (2, 3), (3, 4), (4, 5)]


def test_other_stages_tensors_are_recognised():
    model = torch.nn.Module()
    model.layers = torch.nn.ModuleList([torch.nn.Linear(2, 2), PPMissingLayer()])
    assert on_other_stage(model, "layers.1.mlp.weight")
    assert not on_other_stage(model, "layers.0.weight")
    assert not on_other_stage(model, "norm.weight")
    assert not on_other_stage(model, "layers.7.weight")   # not in the model at all: the loader says so


def test_vocabulary_parts_set_to_none_belong_to_another_stage():
    model = torch.nn.Module()
    model.embed_tokens = None
    model.lm_head = torch.nn.Linear(2, 2)
    assert on_other_stage(model, "embed_tokens.weight")
    assert not on_other_stage(model, "lm_head.weight")
    assert not on_other_stage(model, "typo.weight")
