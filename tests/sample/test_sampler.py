import random

import numpy as np
import pytest
import torch

from strata.sample.logits_processors import apply_logits_processors
from strata.sample.sampler import (
    MetadataCache,
    Sampler,
    SamplingMetadata,
    SamplingRow,
    make_generator,
    row_seed,
)
from strata.sampling_params import SamplingParams

VOCAB = 32


def make_metadata(params, prompts=None, outputs=None, masks=None, generators=None, vocab=VOCAB):
    n = len(params)
    prompts, outputs = prompts or [[]] * n, outputs or [[]] * n
    generators, masks = generators or [None] * n, masks or [None] * n
    rows = [SamplingRow(*fields) for fields in zip(params, prompts, outputs, generators, masks)]
    return SamplingMetadata.from_rows(rows, vocab_size=vocab, device="cpu")


def run(logits, params, **kw):
    return Sampler()(logits, make_metadata(params, vocab=logits.shape[1], **kw))


# ---------- per-row references, plain Python ops ----------


def ref_process(row, p: SamplingParams, prompt, output, mask):
    x = row.clone()
    for token_id, bias in (p.logit_bias or {}).items():
        x[token_id] += bias
    if mask and len(output) < p.min_tokens:
        for token_id in mask:
            x[token_id] = float("-inf")
    for token_id in set(prompt) | set(output):
        v = x[token_id].item()
        x[token_id] = v / p.repetition_penalty if v > 0 else v * p.repetition_penalty
    for token_id in set(output):
        x[token_id] -= p.frequency_penalty * output.count(token_id) + p.presence_penalty
    return x


def ref_allowed_probs(row, p: SamplingParams):
    """softmax(row / T) restricted to the top_k / top_p / min_p set and renormalised."""
    probs = torch.softmax(row / p.temperature, dim=-1)
    order = torch.argsort(probs, descending=True).tolist()
    keep = order[: p.top_k] if p.top_k > 0 else order
    kept_mass = sum(probs[i].item() for i in keep)
    cum, top_p_keep = 0.0, []
    for i in keep:
        top_p_keep.append(i)
        cum += probs[i].item() / kept_mass
        if cum >= p.top_p:
            break
    keep = top_p_keep
    max_prob = probs[keep[0]].item()
    keep = [i for i in keep if probs[i].item() >= p.min_p * max_prob]
    out = torch.zeros_like(probs)
    out[keep] = probs[keep]
    return out / out.sum()


# ---------- greedy and logits processors ----------


def test_greedy_is_argmax():
    torch.manual_seed(0)
    logits = torch.randn(6, VOCAB)
    out = run(logits, [SamplingParams(temperature=0.0)] * 6)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))
    assert out.sampled_token_ids.dtype == torch.int64
    assert out.logprobs is None


def test_penalties_crafted_values():
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0, frequency_penalty=0.5,
                       presence_penalty=0.25)
    md = make_metadata([p], prompts=[[0]], outputs=[[1, 2, 2]], vocab=4)
    processed = apply_logits_processors(logits, md)
    # token 0: prompt only -> 2/2; token 1: -1*2 - 0.5 - 0.25; token 2: 0.5/2 - 2*0.5 - 0.25
    expected = torch.tensor([[1.0, -2.75, -1.0, 3.0]])
    assert torch.allclose(processed, expected)
    assert torch.equal(logits, torch.tensor([[2.0, -1.0, 0.5, 3.0]]))  # input untouched


@pytest.mark.parametrize("kind", ["repetition", "frequency", "presence"])
def test_each_penalty_moves_the_greedy_choice(kind):
    logits = torch.tensor([[3.0, 2.0, -5.0]])
    kwargs = {"repetition": {"repetition_penalty": 2.0},
              "frequency": {"frequency_penalty": 0.6},
              "presence": {"presence_penalty": 1.5}}[kind]
    p = SamplingParams(temperature=0.0, **kwargs)
    out = run(logits, [p], outputs=[[0, 0]])
    assert out.sampled_token_ids.tolist() == [1]
    # Repetition also counts prompt tokens; frequency and presence do not.
    out = run(logits, [p], prompts=[[0]], outputs=[[]])
    assert out.sampled_token_ids.tolist() == [1 if kind == "repetition" else 0]


def test_processors_match_reference_on_mixed_batch():
    torch.manual_seed(1)
    logits = torch.randn(5, VOCAB) * 3
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3),
        SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4, logit_bias={3: 4.0}),
        SamplingParams(),
        SamplingParams(repetition_penalty=0.8, presence_penalty=1.0, min_tokens=4),
        SamplingParams(temperature=0.0, logit_bias={"5": -2.0, 6: 1.0}, min_tokens=1),
    ]
    prompts = [[1, 2, 3], [4, 4], [], [7, 8, 9, 7], [0]]
    outputs = [[2, 5, 5], [3, 3, 10], [1], [9, 11], [12]]
    masks = [None, {0, 1}, {2}, {31, 30}, {5}]
    md = make_metadata(params, prompts, outputs, masks)
    processed = apply_logits_processors(logits, md)
    for i, p in enumerate(params):
        expected = ref_process(logits[i], p, prompts[i], outputs[i], masks[i])
        assert torch.allclose(processed[i], expected, atol=1e-6), i


def test_penalties_equal_the_dense_formula_bit_for_bit():
    """The scatter/gather penalties give exactly what whole-tensor penalties give."""
    gen = torch.Generator().manual_seed(11)
    rng = random.Random(11)
    num_rows, vocab = 12, 50
    logits = torch.randn(num_rows, vocab, generator=gen) * 4
    logits[3, :10] = float("-inf")
    logits[4] = 0.0  # zeros: neither divided nor multiplied into anything new
    params, prompts, outputs = [], [], []
    for row in range(num_rows):
        params.append(SamplingParams(
            repetition_penalty=rng.choice([1.0, 0.7, 1.4]),
            frequency_penalty=rng.choice([0.0, -0.5, 1.1]),
            presence_penalty=rng.choice([0.0, 0.3, -1.2])))
        prompts.append([rng.randrange(vocab) for _ in range(rng.randint(0, 30))])
        outputs.append([rng.randrange(12) for _ in range(rng.randint(0, 30))])  # many repeats
    processed = apply_logits_processors(logits, make_metadata(params, prompts, outputs, vocab=vocab))
    # The dense version, as strata computed it before: counts and masks over the whole vocab.
    counts = torch.zeros(num_rows, vocab)
    seen = torch.zeros(num_rows, vocab, dtype=torch.bool)
    for row in range(num_rows):
        for token_id in outputs[row]:
            counts[row, token_id] += 1
        if params[row].repetition_penalty != 1.0:
            seen[row, prompts[row]] = True
    seen |= counts > 0
    col = lambda name: torch.tensor([getattr(p, name) for p in params])[:, None]
    rep = torch.where(seen, col("repetition_penalty").expand(-1, vocab), torch.ones(1))
    dense = torch.where(logits > 0, logits / rep, logits * rep)
    dense = dense - col("frequency_penalty") * counts
    dense = dense - col("presence_penalty") * (counts > 0).float()
    assert torch.equal(processed, dense)


def test_logit_bias_forces_token():
    torch.manual_seed(2)
    logits = torch.randn(4, VOCAB)
    params = [SamplingParams(temperature=t, logit_bias={17: 100.0}) for t in (0.0, 0.5, 1.0, 2.0)]
    assert run(logits, params).sampled_token_ids.tolist() == [17] * 4


def test_min_tokens_mask_forbids_eos_until_reached():
    eos = 4
    logits = torch.zeros(1, VOCAB)
    logits[0, eos] = 10.0
    p = SamplingParams(temperature=0.0, min_tokens=3)
    out = run(logits, [p], outputs=[[1]], masks=[{eos}])
    assert out.sampled_token_ids.item() != eos
    out = run(logits, [p], outputs=[[1, 2, 3]], masks=[{eos}])
    assert out.sampled_token_ids.item() == eos


# ---------- truncation and random sampling ----------


@pytest.mark.parametrize("kwargs", [{"top_k": 1}, {"top_p": 1e-6}, {"min_p": 1.0}])
def test_truncation_to_one_token_equals_greedy(kwargs):
    torch.manual_seed(3)
    logits = torch.randn(64, VOCAB) * 2
    out = run(logits, [SamplingParams(temperature=1.5, **kwargs)] * 64)
    assert torch.equal(out.sampled_token_ids, logits.argmax(-1))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": 1.0},
        {"temperature": 0.6},
        {"temperature": 1.7, "top_k": 3},
        {"temperature": 1.0, "top_p": 0.7},
        {"temperature": 1.2, "min_p": 0.2},
        {"temperature": 0.9, "top_k": 5, "top_p": 0.8, "min_p": 0.05},
    ],
)
def test_random_sampling_distribution(kwargs):
    torch.manual_seed(4)
    num_draws, vocab = 20_000, 8
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    p = SamplingParams(**kwargs)
    # Every row is the same request, so one call gives num_draws independent draws.
    out = run(row.expand(num_draws, vocab).clone(), [p] * num_draws)
    counts = torch.bincount(out.sampled_token_ids, minlength=vocab).double()
    expected = ref_allowed_probs(row, p).double() * num_draws
    allowed = expected > 0
    assert counts[~allowed].sum() == 0, "sampled outside the allowed set"
    chi2 = ((counts[allowed] - expected[allowed]) ** 2 / expected[allowed]).sum().item()
    # 99.99% quantile of chi-square with <= 7 degrees of freedom is < 30.
    assert chi2 < 30, chi2


def test_mixed_greedy_and_random_batch():
    torch.manual_seed(5)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(top_k=1),
              SamplingParams(temperature=0.0, presence_penalty=0.1),
              SamplingParams(temperature=0.8, top_p=0.9, seed=1),
              SamplingParams(min_p=1.0), SamplingParams(temperature=0.0, logprobs=2)]
    generators = [None, None, None, make_generator(1, 0, 0), None, None]
    out = run(logits, params, generators=generators)
    ids = out.sampled_token_ids.tolist()
    argmax = logits.argmax(-1).tolist()
    assert [ids[i] for i in (0, 1, 2, 4, 5)] == [argmax[i] for i in (0, 1, 2, 4, 5)]
    assert 0 <= ids[3] < VOCAB
    assert out.logprobs.token_ids.shape == (6, 3)


# ---------- seeded rows ----------


def _seeded_token(logits_row, batch_logits, position, seed, step, seq_index=0):
    """Sample `logits_row` placed at `position` inside a batch of unseeded rows."""
    rows = list(batch_logits)
    rows.insert(position, logits_row)
    params = [SamplingParams(temperature=1.0)] * len(rows)
    params[position] = SamplingParams(temperature=1.0, seed=seed)
    generators = [None] * len(rows)
    generators[position] = make_generator(seed, seq_index, step)
    out = run(torch.stack(rows), params, generators=generators)
    return out.sampled_token_ids[position].item()


def test_seeded_row_independent_of_batch():
    torch.manual_seed(6)
    vocab = 1000
    row = torch.randn(vocab) * 0.1  # nearly flat, so a draw depends on the noise
    alone = _seeded_token(row, [], 0, seed=42, step=3)
    rng = random.Random(0)
    for trial in range(5):
        others = [torch.randn(vocab) for _ in range(rng.randint(1, 6))]
        position = rng.randint(0, len(others))
        torch.manual_seed(100 + trial)  # the unseeded rows' global randomness changes too
        assert _seeded_token(row, others, position, seed=42, step=3) == alone


def test_seeded_rows_differ_across_steps_sequences_and_seeds():
    torch.manual_seed(7)
    row = torch.randn(1000) * 0.1
    by_step = {_seeded_token(row, [], 0, seed=42, step=s) for s in range(20)}
    assert len(by_step) > 10
    by_seq = {_seeded_token(row, [], 0, seed=42, step=0, seq_index=i) for i in range(20)}
    assert len(by_seq) > 10
    by_seed = {_seeded_token(row, [], 0, seed=s, step=0) for s in range(20)}
    assert len(by_seed) > 10


def test_make_generator_is_stateless():
    a = torch.rand(5, generator=make_generator(9, 1, 2))
    b = torch.rand(5, generator=make_generator(9, 1, 2))
    c = torch.rand(5, generator=make_generator(9, 2, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    make_generator(-1, 0, 0)
    make_generator(2**70, 3, 10**6)


# ---------- logprobs ----------


def test_logprobs_are_raw_and_sorted():
    torch.manual_seed(8)
    logits = torch.randn(4, VOCAB) * 2
    params = [
        SamplingParams(temperature=0.0, logprobs=5, repetition_penalty=1.5),
        SamplingParams(temperature=0.7, logprobs=1, presence_penalty=1.0, top_k=4),
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=2.0, logprobs=0, logit_bias={0: 3.0}),
    ]
    out = run(logits, params, prompts=[[1, 2]] * 4, outputs=[[3, 4]] * 4)
    lp = out.logprobs
    raw = torch.log_softmax(logits, dim=-1)
    assert lp.token_ids.shape == lp.logprobs.shape == (4, 6)
    assert lp.token_ids.dtype == torch.int64 and lp.ranks.dtype == torch.int64
    sampled = out.sampled_token_ids
    assert torch.equal(lp.token_ids[:, 0], sampled)
    assert torch.allclose(lp.logprobs[:, 0], raw.gather(1, sampled[:, None])[:, 0])
    top_values, top_ids = raw.topk(5, dim=-1)
    assert torch.equal(lp.token_ids[:, 1:], top_ids)
    assert torch.allclose(lp.logprobs[:, 1:], top_values)
    assert torch.all(lp.logprobs[:, 1:-1] >= lp.logprobs[:, 2:])
    for i in range(4):
        expected_rank = 1 + sum(1 for v in raw[i] if v > raw[i, sampled[i]])
        assert lp.ranks[i].item() == expected_rank


def test_rank_of_non_argmax_sampled_token():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0, -1.0]])
    # The bias makes token 2 win, but logprobs and ranks describe the raw model output.
    p = SamplingParams(temperature=0.0, logprobs=2, logit_bias={2: 10.0})
    out = run(logits, [p])
    assert out.sampled_token_ids.tolist() == [2]
    assert out.logprobs.ranks.tolist() == [3]
    assert out.logprobs.token_ids.tolist() == [[2, 1, 3]]
    raw = torch.log_softmax(logits, dim=-1)[0]
    assert torch.allclose(out.logprobs.logprobs[0], raw[[2, 1, 3]])


# ---------- metadata ----------


def test_metadata_skips_unused_features():
    md = make_metadata([SamplingParams(), SamplingParams(temperature=0.0, top_k=3)])
    assert md.top_k is None and md.top_p is None and md.min_p is None
    assert md.no_penalties and md.output_token_index is None and md.prompt_token_index is None
    assert md.logit_bias_index is None and md.min_tokens_index is None
    assert md.max_num_logprobs is None and md.seeds is None  # CPU path: generators, no seeds
    assert md.temperature.tolist() == [1.0, 0.0]
    assert not md.all_greedy and not md.all_random


def test_metadata_builds_tensors():
    params = [SamplingParams(top_k=5, repetition_penalty=1.2, logprobs=3, min_tokens=2),
              SamplingParams(top_p=0.5, top_k=VOCAB + 10, logprobs=1, presence_penalty=0.5),
              SamplingParams(logit_bias={7: 2.0, 9: -1.0}, min_tokens=3)]
    md = make_metadata(params, prompts=[[1, 2, 3], [4], [5]], outputs=[[5, 6], [], [8]],
                       masks=[{0}, {0}, {1, 2}])
    assert md.top_k.tolist() == [5, VOCAB, VOCAB]
    assert md.top_p.tolist() == [1.0, 0.5, 1.0]
    # Flat positions row * VOCAB + token: outputs of penalised rows, prompts of repetition rows.
    assert md.output_token_index.tolist() == [5, 6]
    assert md.prompt_token_index.tolist() == [1, 2, 3]
    assert md.repetition_penalties.tolist() == pytest.approx([1.2, 1.0, 1.0])
    assert md.presence_penalties.tolist() == pytest.approx([0.0, 0.5, 0.0])
    assert md.logit_bias_index.tolist() == [2 * VOCAB + 7, 2 * VOCAB + 9]
    assert md.logit_bias_values.tolist() == [2.0, -1.0]
    # Row 0 reached min_tokens, row 1 has no mask, row 2 bans {1, 2}.
    assert sorted(md.min_tokens_index.tolist()) == [2 * VOCAB + 1, 2 * VOCAB + 2]
    assert md.max_num_logprobs == 3


def test_metadata_accepts_numpy_token_arrays():
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5)] * 2
    lists = make_metadata(params, prompts=[[1, 2], [3]], outputs=[[4, 4], [5]])
    arrays = make_metadata(params, prompts=[np.array([1, 2]), np.array([3], np.int32)],
                           outputs=[np.array([4, 4]), np.array([5])])
    assert torch.equal(lists.output_token_index, arrays.output_token_index)
    assert torch.equal(lists.prompt_token_index, arrays.prompt_token_index)


def test_metadata_empty_batch_and_empty_token_lists():
    md = make_metadata([SamplingParams(repetition_penalty=1.3)], prompts=[[]], outputs=[[]])
    assert md.output_token_index.numel() == 0 and md.prompt_token_index.numel() == 0
    logits = torch.randn(1, VOCAB)
    assert torch.equal(apply_logits_processors(logits, md), logits)
    md = SamplingMetadata.from_rows([], vocab_size=VOCAB, device="cpu")
    assert md.temperature.shape == (0,) and md.all_greedy


def _fields(md):
    return {k: v.tolist() if isinstance(v, torch.Tensor) else v for k, v in vars(md).items()}


def test_metadata_cache_reuses_only_what_cannot_change():
    cache = MetadataCache()
    greedy, hot = SamplingParams(temperature=0.0, logit_bias={3: 1.0}), SamplingParams(temperature=0.7, top_p=0.9)
    banned = SamplingParams(temperature=0.0, min_tokens=4)

    def get(params, outputs=None, masks=None, generators=None):
        n = len(params)
        rows = [SamplingRow(p, [1, 2], out, gen, mask) for p, out, gen, mask in
                zip(params, outputs or [[5]] * n, generators or [None] * n, masks or [None] * n)]
        md = cache.get(rows, VOCAB, "cpu")
        assert _fields(md) == _fields(SamplingMetadata.from_rows(rows, VOCAB, "cpu"))
        return md

    first = get([greedy, hot])
    assert get([greedy, hot], outputs=[[5, 6], [7]]) is first            # a steady batch: no rebuild
    assert get([hot, greedy]) is not first                               # rows reordered
    equal_twin = SamplingParams(temperature=0.0, logit_bias={3: 1.0})
    assert get([equal_twin, hot]) is not get([greedy, hot])              # another request's params
    masked = get([banned], masks=[{0}])
    assert masked.min_tokens_index.tolist() == [0]
    assert get([banned], masks=[{0}]) is masked
    assert get([banned]).min_tokens_index is None                        # min_tokens reached
    penalised = SamplingParams(temperature=0.0, frequency_penalty=0.5)
    a = get([penalised], outputs=[[5]])
    b = get([penalised], outputs=[[5, 9]])                               # seen tokens grow: rebuilt
    assert a is not b and b.output_token_index.tolist() == [5, 9]
    seeded = SamplingParams(temperature=0.8, seed=1)
    c = get([seeded], generators=[make_generator(1, 0, 1)])
    d = get([seeded], generators=[make_generator(1, 0, 2)])              # a new draw per position
    assert c is not d and d.generators[0].initial_seed() == row_seed(1, 0, 2)


def test_to_lists_is_one_copy_of_everything():
    torch.manual_seed(9)
    logits = torch.randn(3, VOCAB)
    params = [SamplingParams(temperature=0.0, logprobs=2)] * 3
    out = run(logits, params)
    ids, lp_ids, lp_values, ranks = out.to_lists()
    assert ids == out.sampled_token_ids.tolist()
    assert lp_ids == out.logprobs.token_ids.tolist()
    assert lp_values == out.logprobs.logprobs.tolist()  # bit-exact round trip of float32
    assert ranks == out.logprobs.ranks.tolist() == [1, 1, 1]
    out = run(logits, [SamplingParams(temperature=0.0)] * 3)
    assert out.to_lists() == (logits.argmax(-1).tolist(), None, None, None)


def test_row_seed_is_the_generator_seed():
    assert make_generator(5, 1, 7).initial_seed() == row_seed(5, 1, 7) < 2**63
    assert row_seed(5, 1, 7) != row_seed(5, 1, 8)
