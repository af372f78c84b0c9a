"""strata.kernels.sampling against its torch reference, and the sampler's kernel path.

Without a GPU the kernel runs in Triton's interpreter, where every program costs tens of
milliseconds: CPU cases keep to a few rows and small vocabularies (the frequency test uses a few
hundred rows of 8 tokens). With CUDA the same checks also run at serving sizes.
"""

import os

import numpy as np
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from strata.kernels import sampling as sampling_mod
from strata.kernels.sampling import greedy_tokens, sample_tokens, sampling_reference
from strata.sample import sampler as sampler_mod
from strata.sample.logits_processors import apply_logits_processors
from strata.sample.sampler import Sampler, SamplingMetadata, SamplingRow, row_seed
from strata.sampling_params import SamplingParams

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"

# The interpreter computes -inf - -inf and log(0) in numpy on the way to masked-out values.
pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")


def _params(num_rows, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, vocab=None):
    """Per-row parameter tensors (scalars are broadcast) in the kernel's layout."""
    def col(v, dtype):
        t = torch.as_tensor(v, dtype=dtype)
        return (t.expand(num_rows) if t.dim() == 0 else t).contiguous().to(DEVICE)
    return (col(temperature, torch.float32), col(top_k, torch.int64),
            col(top_p, torch.float32), col(min_p, torch.float32))


def _check_in_allowed(logits, temperature, top_k, top_p, min_p, seeds):
    out = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds)
    allowed, probs = sampling_reference(logits, temperature, top_k, top_p, min_p)
    rows = torch.arange(logits.shape[0], device=logits.device)
    assert out.dtype == torch.int64 and out.shape == (logits.shape[0],)
    bad = (~allowed[rows, out]).nonzero().flatten().tolist()
    assert not bad, f"rows {bad} drew {out[bad].tolist()} outside their allowed sets"
    assert torch.all(probs[rows, out] > 0)
    return out, allowed


# ---------- greedy ----------


def test_greedy_rows_take_the_argmax_lowest_index_on_ties():
    torch.manual_seed(0)
    logits = torch.randn(6, 1000, device=DEVICE)
    logits[1, [3, 700, 999]] = 50.0  # ties: torch.argmax gives the lowest index
    logits[2] = 0.0  # all tied
    logits[3, :500] = float("-inf")
    logits[4] = float("-inf")  # nothing finite: index 0, like torch.argmax
    logits[5, 999] = 1e30  # the last column
    temperature, top_k, top_p, min_p = _params(6, temperature=0.0)
    out = sample_tokens(logits, temperature, top_k, top_p, min_p, torch.arange(6, device=DEVICE))
    assert out.tolist() == logits.argmax(dim=1).tolist()


@pytest.mark.parametrize("chunk", [None, 64])
def test_greedy_tokens_equal_torch_argmax(chunk, monkeypatch):
    """The chunked argmax of all-greedy batches: the same ids as torch.argmax, with the max in
    any chunk, ties across chunks (lowest index), a NaN (it wins, as in torch), rows of -inf
    and a vocab that is not a whole number of chunks (64-word chunks: 16 programs a row)."""
    if chunk:
        monkeypatch.setattr(sampling_mod, "_ARGMAX_CHUNK", chunk)
    torch.manual_seed(1)
    logits = torch.randn(7, 1000, device=DEVICE)
    logits[1, [70, 700, 999]] = 50.0      # tied across chunks
    logits[2] = 0.0
    logits[3, :990] = float("-inf")
    logits[4] = float("-inf")
    logits[5, 999] = float("inf")
    logits[6, [5, 600]] = float("nan")    # the first NaN wins over the larger values
    logits[6, 3] = 1e30
    assert greedy_tokens(logits).tolist() == logits.argmax(dim=1).tolist()
    assert greedy_tokens(logits[:, :1]).tolist() == [0] * 7
    assert greedy_tokens(logits[:0]).shape == (0,)
    with pytest.raises(ValueError, match="float32"):
        greedy_tokens(logits.half())


# ---------- truncation ----------


@pytest.mark.parametrize("vocab", [50, 257, 1000])
def test_draws_lie_in_the_allowed_set_for_parameter_mixes(vocab):
    gen = torch.Generator().manual_seed(vocab)
    num_rows = 9
    logits = (torch.randn(num_rows, vocab, generator=gen) * 3).to(DEVICE)
    pick = lambda options: torch.tensor(options)[torch.randint(len(options), (num_rows,),
                                                               generator=gen)]
    temperature = pick([0.5, 1.0, 2.0])
    temperature[0] = 0.0  # one greedy row in the mix
    top_k = pick([0, 1, 5, vocab])
    top_p = pick([0.1, 0.9, 1.0])
    min_p = pick([0.0, 0.2])
    params = [t.to(DEVICE) for t in (temperature, top_k, top_p, min_p)]
    seeds = torch.randint(1 << 62, (num_rows,), generator=gen).to(DEVICE)
    out, allowed = _check_in_allowed(logits, *params, seeds)
    assert out[0].item() == logits[0].argmax().item()
    # top_k=1 and greedy rows allow one token exactly.
    for row in range(num_rows):
        if top_k[row] == 1 or temperature[row] == 0:
            assert allowed[row].sum().item() == 1


def test_each_truncation_alone_matches_its_definition():
    vocab = 200
    torch.manual_seed(1)
    row = torch.randn(vocab) * 2
    logits = row.expand(4, vocab).contiguous().to(DEVICE)
    temperature, top_k, top_p, min_p = _params(4, temperature=0.7)
    top_k[0], top_p[1], min_p[2] = 7, 0.5, 0.3
    allowed, probs = sampling_reference(logits, temperature, top_k, top_p, min_p)
    order = row.argsort(descending=True).tolist()
    assert set(allowed[0].nonzero().flatten().tolist()) == set(order[:7])
    p = torch.softmax(row / 0.7, dim=0)
    cum = p[order].cumsum(0)
    n_keep = int((cum < 0.5).sum()) + 1  # the smallest prefix whose mass reaches top_p
    assert set(allowed[1].nonzero().flatten().tolist()) == set(order[:n_keep])
    assert set(allowed[2].nonzero().flatten().tolist()) == set(
        (p >= 0.3 * p.max()).nonzero().flatten().tolist())
    assert allowed[3].all()
    assert torch.allclose(probs[3].cpu(), p, atol=1e-6)
    seeds = torch.arange(4, device=DEVICE) + 11
    for trial in range(3):
        _check_in_allowed(logits, temperature, top_k, top_p, min_p, seeds + 100 * trial)


def test_ties_at_the_threshold_are_kept():
    vocab = 64
    logits = torch.zeros(3, vocab, device=DEVICE)
    logits[:, :4] = 2.0  # four tokens tied at the top, the rest tied below
    temperature, top_k, top_p, min_p = _params(3, temperature=1.0)
    top_k[0] = 2  # the 2nd largest value is tied with two more: all four are kept
    top_p[1] = 0.05  # the top mass is reached inside the tie: the whole tie is kept
    top_k[2] = 10  # cuts inside the lower tie: all 60 of them stay
    allowed, _ = sampling_reference(logits, temperature, top_k, top_p, min_p)
    assert allowed.sum(dim=1).tolist() == [4, 4, vocab]
    for trial in range(3):
        _check_in_allowed(logits, temperature, top_k, top_p, min_p,
                          torch.arange(3, device=DEVICE) + 7 * trial)


def test_banned_tokens_are_never_drawn():
    vocab = 300
    torch.manual_seed(2)
    logits = torch.randn(8, vocab, device=DEVICE)
    logits[:, ::2] = float("-inf")  # half the vocabulary banned
    logits[:, 1] = -1e30  # "very negative": exp underflows to 0
    logits[6, 3:] = float("-inf")  # one allowed token left (column 1 sits at -1e30)
    logits[7, :] = float("-inf")
    logits[7, 5] = -1e4  # the only finite value is very negative
    temperature, top_k, top_p, min_p = _params(8, temperature=2.0)
    top_k[1], top_k[2], top_p[3], min_p[4] = 200, 150, 0.99, 0.001
    top_k[6] = 250  # more than the finite tokens: the search is skipped, nothing breaks
    for trial in range(2):
        seeds = torch.arange(8, device=DEVICE) * 31 + trial
        out, _ = _check_in_allowed(logits, temperature, top_k, top_p, min_p, seeds)
        assert torch.isfinite(logits[torch.arange(8), out]).all()
        assert out[6].item() in (1,) and out[7].item() == 5


# ---------- seeds ----------


def test_same_seed_same_draws_different_seed_different_draws():
    vocab = 1000
    torch.manual_seed(3)
    logits = (torch.randn(8, vocab) * 0.1).to(DEVICE)  # nearly flat: draws follow the noise
    temperature, top_k, top_p, min_p = _params(8, temperature=1.0, top_p=0.95)
    seeds = torch.tensor([row_seed(42, 0, s) for s in range(8)], device=DEVICE)
    first = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds)
    again = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds)
    assert torch.equal(first, again)
    other = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds + 1)
    assert (first != other).sum().item() >= 6
    assert len(set(first.tolist())) >= 6  # different positions of one request differ too
    # A row's draw depends on its seed and logits only, not on its place in the batch.
    perm = torch.tensor([3, 0, 7, 1, 6, 2, 5, 4], device=DEVICE)
    shuffled = sample_tokens(logits[perm].contiguous(), temperature, top_k, top_p, min_p,
                             seeds[perm].contiguous())
    assert torch.equal(shuffled, first[perm])


# ---------- distribution ----------


def test_draw_frequencies_follow_the_reference_probabilities():
    vocab = 8
    row = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.2, 1.5])
    # Three settings side by side; every row is a fresh draw (its own seed).
    # Sorted, the row is 2, 1.5, 1, .5, .2, 0, -.5, -1. At T=1.5 top_k=6 drops the last two,
    # top_p=0.9 the 0 (the five above it hold .917 of the rest), min_p=0.32 the .2 (at .30 of
    # the top probability): four tokens stay, each cut by a different rule.
    settings = [{"temperature": 0.8},
                {"temperature": 1.5, "top_k": 6, "top_p": 0.9, "min_p": 0.32}]
    if CUDA:
        settings.append({"temperature": 1.0, "top_p": 0.8})
    per_setting = 5000 if CUDA else 200
    num_rows = per_setting * len(settings)
    columns = {name: [] for name in ("temperature", "top_k", "top_p", "min_p")}
    defaults = {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}
    for s in settings:
        for name in columns:
            columns[name] += [s.get(name, defaults[name])] * per_setting
    temperature, top_k, top_p, min_p = _params(num_rows, **columns)
    logits = row.expand(num_rows, vocab).contiguous().to(DEVICE)
    seeds = torch.randint(1 << 62, (num_rows,), generator=torch.Generator().manual_seed(4))
    out = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds.to(DEVICE)).cpu()
    _, probs = sampling_reference(logits, temperature, top_k, top_p, min_p)
    for i in range(len(settings)):
        part = slice(i * per_setting, (i + 1) * per_setting)
        counts = torch.bincount(out[part], minlength=vocab).double()
        expected = probs[i * per_setting].double().cpu() * per_setting
        kept = expected > 0
        assert counts[~kept].sum() == 0, "drew a token outside the allowed set"
        chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
        # 99.9% quantile of chi-square with <= 7 degrees of freedom: 24.3. The seed is fixed.
        assert chi2 < 24.3, (settings[i], chi2, counts.tolist(), expected.tolist())


# ---------- the wrapper ----------


def test_wrapper_checks_inputs():
    logits = torch.randn(2, 10, device=DEVICE)
    temperature = torch.ones(2, device=DEVICE)
    with pytest.raises(ValueError, match="float32"):
        sample_tokens(logits.half(), temperature)
    with pytest.raises(ValueError, match="contiguous"):
        sample_tokens(torch.randn(10, 2, device=DEVICE).t(), temperature)
    with pytest.raises(ValueError, match="temperature"):
        sample_tokens(logits, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match="top_k"):
        sample_tokens(logits, temperature, top_k=torch.ones(2, device=DEVICE))
    assert sample_tokens(logits[:0], temperature[:0]).shape == (0,)
    # A row view with a larger row stride works: only the vocab must be contiguous.
    wide = torch.randn(2, 16, device=DEVICE)
    out = sample_tokens(wide[:, :10], torch.zeros(2, device=DEVICE))
    assert out.tolist() == wide[:, :10].argmax(dim=1).tolist()


# ---------- the sampler on the kernel path ----------


@pytest.fixture
def kernel_path(monkeypatch):
    monkeypatch.setattr(sampler_mod, "kernel_path", lambda device: True)


def _rows(params, prompts, outputs, masks=None):
    masks = masks or [None] * len(params)
    seeds = [None if p.seed is None else row_seed(p.seed, 0, len(out))
             for p, out in zip(params, outputs)]
    return [SamplingRow(*fields) for fields in zip(params, prompts, outputs, [None] * len(params),
                                                      masks, seeds)]


def test_sampler_kernel_path_penalties_bias_and_min_tokens(kernel_path):
    vocab = 64
    torch.manual_seed(5)
    logits = (torch.randn(6, vocab) * 2).to(DEVICE)
    params = [
        SamplingParams(temperature=0.0, repetition_penalty=1.3, frequency_penalty=0.4),
        SamplingParams(temperature=0.7, top_k=5, presence_penalty=1.0, logit_bias={3: 2.0}),
        SamplingParams(temperature=1.2, top_p=0.8, repetition_penalty=0.8, seed=9),
        SamplingParams(temperature=0.9, min_p=0.2, min_tokens=4, logprobs=3),
        SamplingParams(temperature=0.0, logit_bias={5: 100.0}),
        SamplingParams(temperature=1.0, top_k=1, frequency_penalty=-0.5),
    ]
    prompts = [[1, 2, 3], [4, 4], [7, 8, 9, 7], [], [0], [10]]
    outputs = [[2, 5, 5], [3, 3, 10], [9, 11], [1], [12], [13, 13]]
    masks = [None, None, None, {6, 7}, None, None]
    rows = _rows(params, prompts, outputs, masks)
    md = SamplingMetadata.from_rows(rows, vocab, DEVICE)
    assert md.seeds is not None and md.seeds[2].item() == row_seed(9, 0, 2)
    processed = apply_logits_processors(logits, md)
    out = Sampler()(logits, md)
    # The processed logits are those of the CPU path (same arithmetic, pinned by tests/sample).
    cpu_md = SamplingMetadata.from_rows(rows, vocab, "cpu")
    expected = apply_logits_processors(logits.cpu(), cpu_md)
    assert torch.allclose(processed.cpu(), expected, atol=1e-6)
    temperature = torch.tensor([p.temperature for p in params], device=DEVICE)
    allowed, _ = sampling_reference(processed, temperature, md.top_k, md.top_p, md.min_p)
    ids = out.sampled_token_ids
    assert allowed[torch.arange(6, device=DEVICE), ids].all()
    assert ids[4].item() == 5 and ids[3].item() not in (6, 7)
    assert ids[0].item() == processed[0].argmax().item()
    ids_host, lp_ids, _, ranks = out.to_lists()
    assert ids_host == ids.tolist() and [r[0] for r in lp_ids] == ids_host and len(ranks) == 6
    # The seeded row draws the same token from a fresh batch around it.
    again = Sampler()(logits[1:3], SamplingMetadata.from_rows(rows[1:3], vocab, DEVICE))
    assert again.sampled_token_ids[1].item() == ids[2].item()


# ---------- serving sizes (GPU only) ----------


@pytest.mark.skipif(not CUDA, reason="serving sizes need a GPU")
def test_serving_size_batch_against_reference():
    num_rows, vocab = 256, 128256
    gen = torch.Generator().manual_seed(6)
    logits = torch.randn(num_rows, vocab, generator=gen) * 2.5
    logits[:, :30] += torch.linspace(12, 3, 30)  # a peaked head like an LM's
    logits = logits.to(DEVICE)
    pick = lambda options: torch.tensor(options)[torch.randint(len(options), (num_rows,),
                                                               generator=gen)].to(DEVICE)
    temperature = pick([0.0, 0.6, 1.0, 1.3])
    top_k = pick([0, 1, 20, 50, 1000, vocab])
    top_p = pick([0.1, 0.8, 0.95, 1.0])
    min_p = pick([0.0, 0.05])
    seeds = torch.randint(1 << 62, (num_rows,), generator=gen).to(DEVICE)
    passes = torch.zeros(num_rows, dtype=torch.int32, device=DEVICE)
    out = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds, passes_out=passes)
    allowed, _ = sampling_reference(logits, temperature, top_k, top_p, min_p)
    assert allowed[torch.arange(num_rows, device=DEVICE), out].all()
    assert torch.equal(out[temperature == 0], logits[temperature == 0].argmax(dim=1))
    assert passes.max().item() < 30, passes.tolist()
    # Flat rows (a high temperature on a flat distribution) keep most of the vocabulary.
    flat = torch.randn(8, vocab, generator=gen).to(DEVICE) * 0.3
    t, k, p, m = _params(8, temperature=1.0, top_p=0.95)
    _check_in_allowed(flat, t, k, p, m, seeds[:8])


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_serving_size_frequencies():
    vocab, num_rows = 128256, 20000
    row = torch.full((vocab,), -30.0)
    row[:6] = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5])
    logits = row.to(DEVICE).expand(num_rows, vocab).contiguous()
    temperature, top_k, top_p, min_p = _params(num_rows, temperature=1.0, top_p=0.9)
    seeds = torch.randint(1 << 62, (num_rows,), generator=torch.Generator().manual_seed(7))
    out = sample_tokens(logits, temperature, top_k, top_p, min_p, seeds.to(DEVICE)).cpu()
    _, probs = sampling_reference(logits[:1], temperature[:1], None, top_p[:1], None)
    counts = torch.bincount(out, minlength=vocab).double()
    expected = probs[0].double().cpu() * num_rows
    kept = expected > 0
    assert counts[~kept].sum() == 0
    chi2 = ((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum().item()
    assert chi2 < 24.3, (chi2, counts[:8].tolist(), expected[:8].tolist())


@pytest.mark.skipif(not CUDA, reason="needs a GPU")
def test_sampler_step_never_syncs():
    """The whole kernel-path step (metadata upload, processors, kernel, logprobs) runs with
    CUDA's sync debug mode set to error: any host wait inside would raise."""
    vocab, num_rows = 128256, 256
    torch.manual_seed(8)
    logits = torch.randn(num_rows, vocab, device=DEVICE)
    params = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9, min_p=0.05,
                             presence_penalty=0.1, repetition_penalty=1.1, logprobs=5,
                             logit_bias={1: 1.0}, min_tokens=3, seed=i if i % 2 else None)
              for i in range(num_rows)]
    rows = _rows(params, [list(range(i, i + 300)) for i in range(num_rows)],
                 [[7] * (i % 5) for i in range(num_rows)], [{2}] * num_rows)
    sampler = Sampler()
    sampler(logits, SamplingMetadata.from_rows(rows, vocab, DEVICE))  # warm-up: compiles
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        out = sampler(logits, SamplingMetadata.from_rows(rows, vocab, DEVICE))
    finally:
        torch.cuda.set_sync_debug_mode("default")
    ids, _, lp_vals, _ = out.to_lists()
    assert len(ids) == num_rows and all(0 <= i < vocab for i in ids)
    assert np.isfinite(np.array(lp_vals)).all()
