"""The fast decoder's in-graph sampler (backend/device_sampling.py), run eagerly on the CPU.

The same functions are captured into a CUDA graph on a GPU; bench/check_kernels.py checks that graph
(frequencies, seeded replies), and the Triton noise kernel under the interpreter (test_fast_decode.py).
"""

from __future__ import annotations

import torch

from backend import device_sampling as ds
from backend.generation import InvalidScoreLogitsProcessor, logits_processors
from backend.service import SamplingParams


def test_on_device_only_for_sampling_without_a_penalty():
    assert ds.on_device(SamplingParams())
    assert not ds.on_device(SamplingParams(temperature=0))
    assert not ds.on_device(SamplingParams(repetition_penalty=1.2))
    assert ds.on_device(SamplingParams(repetition_penalty=1.0))


def test_the_device_path_samples_through_the_host_paths_processors():
    params = SamplingParams(temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.3)
    names = ["TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper"]
    host = [type(p).__name__ for p in logits_processors(params)]
    assert host == ["RepetitionPenaltyLogitsProcessor", "InvalidScoreLogitsProcessor", *names]
    device = [type(p).__name__ for p in logits_processors(SamplingParams(temperature=0.7, top_k=20, top_p=0.9))]
    assert device == ["InvalidScoreLogitsProcessor", *names]


def test_guard_is_the_original_nan_inf_rule_without_a_host_branch():
    guard = InvalidScoreLogitsProcessor()
    scores = torch.randn(1, 50)
    assert torch.equal(guard(None, scores), scores)
    for bad in (float("nan"), float("inf"), float("-inf")):
        s = scores.clone()
        s[0, 7] = bad
        out = guard(None, s)
        assert out[0, 5] == 5e4 and out.abs().sum() == 5e4


def draw_counts(logits, params, draws, seed=11):
    procs = logits_processors(params)
    noise = torch.empty(logits.shape[-1])
    counts = torch.zeros(logits.shape[-1], dtype=torch.float64)
    for i in range(draws):
        counts[int(ds.sample(logits, procs, noise, torch.tensor(seed), torch.tensor(i)))] += 1
    want = torch.softmax(procs(None, logits.clone()), dim=-1)[0].double()
    return counts, want


def test_tokens_follow_the_warped_distribution_and_stay_inside_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 64)
    draws = 4000
    counts, want = draw_counts(logits, SamplingParams(temperature=0.8, top_p=0.8), draws)
    kept = want > 0
    assert 1 < int(kept.sum()) < 64
    assert counts[~kept].sum() == 0
    chi2 = (((counts - draws * want) ** 2)[kept] / (draws * want[kept])).sum().item()
    dof = int(kept.sum()) - 1
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, (chi2, dof)


def test_a_wrong_temperature_would_be_caught():
    """The frequency check is sharp enough to tell temperature 0.8 from 1.0."""
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 2
    draws = 4000
    counts, _ = draw_counts(logits, SamplingParams(temperature=1.0, top_p=1.0), draws)
    _, want = draw_counts(logits, SamplingParams(temperature=0.8, top_p=1.0), 1)
    chi2 = ((counts - draws * want) ** 2 / (draws * want)).sum().item()
    assert chi2 > 63 + 5 * (2 * 63) ** 0.5


def test_one_token_per_seed_and_position():
    logits = torch.randn(1, 300)
    procs = logits_processors(SamplingParams())
    noise = torch.empty(300)

    def tok(seed, pos):
        return int(ds.sample(logits, procs, noise, torch.tensor(seed), torch.tensor(pos)))

    assert [tok(5, p) for p in range(20)] == [tok(5, p) for p in range(20)]
    assert [tok(5, p) for p in range(20)] != [tok(6, p) for p in range(20)]


def test_nan_logits_answer_token_5():
    logits = torch.randn(1, 100)
    logits[0, 40] = float("nan")
    token = ds.sample(logits, logits_processors(SamplingParams()), torch.empty(100), torch.tensor(1), torch.tensor(0))
    assert int(token) == 5


def draw_together(logits, settings, seeds, positions):
    """device_sampling.draw_rows for rows of ``settings``, as the batched fast decoder's sampler holds them."""
    floats, kth = ds.row_settings(settings, logits.shape[-1])
    temperature, drop_below = torch.tensor(floats).view(2, -1)
    return ds.draw_rows(logits, temperature, torch.tensor(kth), drop_below, torch.tensor(seeds), torch.tensor(positions))


def test_rows_sampled_together_equal_each_row_sampled_alone():
    """draw_rows (the batched fast decoder's sampler) draws each row as ``sample`` draws it alone, with the
    row's own settings, seed and position: guard, temperature, top-k, top-p, none of them, and a nan row."""
    torch.manual_seed(3)
    settings = [SamplingParams(temperature=0.8, top_p=0.8), SamplingParams(temperature=1.0, top_p=1.0),
                SamplingParams(temperature=0.7, top_k=5, top_p=0.9), SamplingParams(temperature=1.3, top_k=40),
                SamplingParams(temperature=0.5, top_p=0.3), SamplingParams(temperature=0.9, top_k=500)]
    for trial in range(40):
        logits = torch.randn(len(settings), 300) * 3
        if trial % 10 == 0:
            logits[trial % len(settings), 17] = float("nan")
        seeds, positions = [trial * 7 + r for r in range(len(settings))], [trial + 3 * r for r in range(len(settings))]
        together = draw_together(logits.clone(), settings, seeds, positions)
        for r, params in enumerate(settings):
            alone = ds.sample(logits[r:r + 1].clone(), logits_processors(params), torch.empty(300),
                              torch.tensor(seeds[r]), torch.tensor(positions[r]))
            assert int(together[r]) == int(alone), (trial, r)


def test_rows_sampled_together_follow_each_rows_distribution():
    torch.manual_seed(0)
    logits = torch.randn(1, 64).expand(2, 64).contiguous()
    settings = [SamplingParams(temperature=0.8, top_p=0.8), SamplingParams(temperature=1.0, top_p=1.0, top_k=10)]
    draws = 3000
    counts = torch.zeros(2, 64, dtype=torch.float64)
    for i in range(draws):
        tokens = draw_together(logits, settings, [5, 5], [i, i])
        for r in range(2):
            counts[r, int(tokens[r])] += 1
    for r, params in enumerate(settings):
        want = torch.softmax(logits_processors(params)(None, logits[r:r + 1].clone()), dim=-1)[0].double()
        kept = want > 0
        assert counts[r][~kept].sum() == 0
        chi2 = (((counts[r] - draws * want) ** 2)[kept] / (draws * want[kept])).sum().item()
        dof = int(kept.sum()) - 1
        assert chi2 < dof + 5 * (2 * dof) ** 0.5, (r, chi2, dof)


def test_the_batched_decoders_sampler_draws_its_sampling_rows_and_passes_the_greedy_ones():
    """BatchSampler (the batched fast decoder's sampler, eager on the CPU): a cache row set to sample draws as
    draw_rows does; a greedy row, or a sampling row's slot taken by a greedy request, keeps the argmax."""
    from backend.decode.batch_sampler import BatchSampler

    torch.manual_seed(1)
    V = 200
    sampler = BatchSampler(4, V, torch.device("cpu"), use_graphs=False)
    params = SamplingParams(temperature=0.7, top_k=30, top_p=0.9)
    sampler.set_row(0, params, seed=99)
    sampler.set_row(1, None)
    sampler.upload()
    logits, positions = torch.randn(2, V) * 3, torch.tensor([12, 40])
    greedy = logits.argmax(-1)
    tokens = sampler.tokens(2, logits, greedy, positions)
    alone = draw_together(logits[:1], [params], [99], [12])
    assert int(tokens[0]) == int(alone[0]) and int(tokens[1]) == int(greedy[1])
    assert torch.equal(sampler.draw(logits[:1], [0], [12]), alone)  # a prompt's first token, outside the graph
    sampler.set_row(0, None)
    sampler.upload()
    assert torch.equal(sampler.tokens(2, logits, greedy, positions), greedy)
