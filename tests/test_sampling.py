"""The sort-free sampler draws from the exact temperature + top-p distribution (statistical tests, fixed seeds)."""

from __future__ import annotations

import pytest
import torch

from character_baker.backends.generation import decoding, sampling
from character_baker.backends.generation.sampling import CANDIDATES, nucleus_threshold, sample_tokens

DRAWS = 20000
SIGNIFICANCE = 1e-4  # a correct sampler fails one case in 10,000; the seeds are fixed, so runs repeat exactly


def reference_distribution(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """Exact float64 probabilities of one row: softmax(logits / T) on the nucleus, renormalised.

    The nucleus, in descending order: every token whose predecessors hold less than top_p (all
    when top_p >= 1). A group of n tokens tied at the boundary, of which the rule keeps c, gives
    each of them c / n of its probability (a sort keeps some c of them, each equally likely).
    """
    if temperature <= 0:
        return torch.nn.functional.one_hot(logits.argmax(), len(logits)).double()
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    if top_p >= 1:
        return probs
    weights = torch.zeros_like(probs)
    above = 0.0
    for value in torch.unique(probs, sorted=True).flip(0):
        tied = probs == value
        count = int(tied.sum())
        kept = min(count, max(0, int(torch.ceil((top_p - above) / value)))) if above < top_p else 0
        kept = max(kept, 1) if above == 0.0 else kept  # the most probable token is always kept
        weights[tied] = value * kept / count
        above += float(value) * count
    return weights / weights.sum()


def chi_square_p_value(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """p-value of Pearson's chi-square test, pooling the cells expected to hold fewer than 5 draws."""
    small = expected < 5
    observed = torch.cat([counts[~small], counts[small].sum().reshape(1)])
    wanted = torch.cat([expected[~small], expected[small].sum().reshape(1)])
    keep = wanted > 0
    observed, wanted = observed[keep], wanted[keep]
    if len(wanted) < 2:
        return 1.0
    statistic = ((observed - wanted) ** 2 / wanted).sum()
    freedom = torch.tensor(len(wanted) - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(freedom / 2, statistic / 2))


def draw(row: torch.Tensor, temperature: float, top_p: float, shortcut: bool, seed: int = 0) -> torch.Tensor:
    """Counts per token of DRAWS samples of one logit row (the row repeated DRAWS times in one call)."""
    generator = torch.Generator().manual_seed(seed)
    tokens = sample_tokens(row.expand(DRAWS, -1).contiguous(), temperature, top_p, generator,
                           candidate_shortcut=shortcut)
    return torch.bincount(tokens, minlength=len(row)).double()


def case_rows() -> dict[str, tuple[torch.Tensor, float, float]]:
    """Hand-made logit rows: (logits, temperature, top_p), each aimed at one part of the sampler."""
    g = torch.Generator().manual_seed(1)
    gaussian = torch.randn(1000, generator=g)
    masked = torch.randn(300, generator=g) * 2
    masked[::3] = -torch.inf
    return {
        "peaked, inside the candidates": (torch.linspace(40, -40, 500), 0.7, 0.95),
        "boundary token with real mass": (torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 1.0, 0.81),
        "boundary just excluded": (torch.tensor([0.5, 0.3, 0.15, 0.05]).log(), 1.0, 0.79),
        "flat: every token tied": (torch.zeros(200), 0.7, 0.95),
        "flat, tie straddles top_p": (torch.zeros(8), 1.0, 0.3),
        "top_p = 1": (gaussian, 1.0, 1.0),
        "top_p tiny": (gaussian, 1.0, 1e-4),
        "temperature near 0": (gaussian, 1e-3, 0.95),
        "temperature 50: near flat, nucleus past the candidates": (gaussian, 50.0, 0.95),
        "nucleus past the candidates (rejection)": (gaussian, 1.0, 0.9),
        "small top_p over a wide nucleus (threshold search)": (gaussian * 0.1, 1.0, 0.15),
        "masked -inf tokens": (masked, 0.8, 0.9),
        "greedy": (gaussian, 0.0, 0.95),
    }


@pytest.mark.parametrize("shortcut", [True, False], ids=["cpu-shortcut", "threshold-search"])
@pytest.mark.parametrize("name", list(case_rows()))
def test_matches_reference_distribution(name, shortcut):
    logits, temperature, top_p = case_rows()[name]
    expected = reference_distribution(logits, temperature, top_p)
    counts = draw(logits, temperature, top_p, shortcut)
    assert counts[expected == 0].sum() == 0, "drew a token outside the nucleus"
    assert chi_square_p_value(counts, expected * DRAWS) > SIGNIFICANCE
    # Total variation, against what DRAWS exact draws would show (E|binomial deviation| = sqrt(2/pi) sigma).
    sampling_noise = 0.5 * (2 * expected * (1 - expected) / (torch.pi * DRAWS)).sqrt().sum()
    assert 0.5 * (counts / DRAWS - expected).abs().sum() < 1.5 * sampling_noise + 0.005


def test_cases_reach_every_path():
    """The hand-made rows really exercise the fallbacks they are named after."""
    rows = case_rows()
    logits, temperature, top_p = rows["peaked, inside the candidates"]
    assert 1 < int((reference_distribution(logits, temperature, top_p) > 0).sum()) < CANDIDATES
    logits, temperature, top_p = rows["nucleus past the candidates (rejection)"]
    assert int((reference_distribution(logits, temperature, top_p) > 0).sum()) > CANDIDATES
    logits, temperature, top_p = rows["small top_p over a wide nucleus (threshold search)"]
    nucleus = reference_distribution(logits, temperature, top_p) > 0
    assert int(nucleus.sum()) > CANDIDATES and float(torch.softmax(logits.double(), -1)[nucleus].sum()) < 0.2


def test_wrong_nucleus_is_detected():
    """The test has power: one token too many in the nucleus fails it."""
    logits, temperature, top_p = case_rows()["boundary just excluded"]
    counts = draw(logits, temperature, 0.81, shortcut=True)
    assert chi_square_p_value(counts, reference_distribution(logits, temperature, top_p) * DRAWS) < SIGNIFICANCE


def threshold_reference(weights: torch.Tensor, target: float) -> float:
    """The weight of the last token a sort keeps: descending order, predecessors' mass < target."""
    ordered = weights.double().sort(descending=True).values
    before = ordered.cumsum(0) - ordered
    return float(ordered[(before < target).sum() - 1])


@pytest.mark.parametrize("scale", [0.05, 1.0, 8.0])
def test_threshold_search_finds_the_sorts_last_token(scale):
    g = torch.Generator().manual_seed(2)
    weights = torch.softmax(torch.randn(16, 5000, generator=g) * scale, dim=-1)
    weights = weights / weights.amax(dim=-1, keepdim=True)
    top_p = torch.linspace(0.05, 0.99, 16)
    threshold, _ = nucleus_threshold(weights, top_p * weights.sum(dim=-1))
    for row in range(16):
        target = float(top_p[row] * weights[row].double().sum())
        assert threshold[row].item() == pytest.approx(threshold_reference(weights[row], target), rel=1e-6)


def test_per_row_temperature_and_top_p():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(4, 300, generator=g) * 3
    temperature = torch.tensor([0.0, 0.7, 1.0, 2.0])
    top_p = torch.tensor([0.9, 0.5, 1.0, 0.2])
    generator = torch.Generator().manual_seed(0)
    tokens = torch.stack([sample_tokens(logits, temperature, top_p, generator) for _ in range(4000)])
    assert (tokens[:, 0] == logits[0].argmax()).all()  # temperature 0: greedy
    for row in range(1, 4):
        counts = torch.bincount(tokens[:, row], minlength=300).double()
        expected = reference_distribution(logits[row], float(temperature[row]), float(top_p[row]))
        assert counts[expected == 0].sum() == 0
        assert chi_square_p_value(counts, expected * 4000) > SIGNIFICANCE


def test_same_seed_same_tokens_and_shape_checked():
    logits = torch.randn(32, 700, generator=torch.Generator().manual_seed(4))
    first = sample_tokens(logits, 0.9, 0.9, torch.Generator().manual_seed(7))
    assert torch.equal(first, sample_tokens(logits, 0.9, 0.9, torch.Generator().manual_seed(7)))
    with pytest.raises(ValueError, match=r"\[32\] tensor"):
        sample_tokens(logits, torch.ones(3), 0.9)


def test_threshold_search_reads_nothing_on_the_host():
    """Without the CPU shortcut nothing depends on tensor values: it runs on data-less meta tensors.

    (A GPU would wait on every host read; meta tensors raise on one, as the shortcut path shows.)
    """
    logits = torch.empty(8, 1000, device="meta")
    tokens = sample_tokens(logits, torch.full((8,), 0.7, device="meta"), 0.9, candidate_shortcut=False)
    assert tokens.shape == (8,) and tokens.dtype == torch.long
    with pytest.raises(Exception):
        sample_tokens(logits, 0.7, 0.9, candidate_shortcut=True)


def test_decoding_keeps_its_sampler_name():
    assert decoding.sample_tokens is sampling.sample_tokens


def test_repetition_penalty_lowers_only_tokens_the_row_has_generated():
    from character_baker.backends.generation.sampling import RepetitionPenalty

    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0], [2.0, -1.0, 0.5, 3.0]])
    penalty = RepetitionPenalty(2, 4, 2.0, torch.device("cpu"))
    assert torch.equal(penalty(logits), logits)  # nothing generated yet (prompt tokens never count)
    penalty.update(torch.tensor([0, 1]))
    penalty.update(torch.tensor([3, 1]))
    expected = torch.tensor([[1.0, -1.0, 0.5, 1.5], [2.0, -2.0, 0.5, 3.0]])
    assert torch.equal(penalty(logits), expected)
    off = RepetitionPenalty(2, 4, 1.0, torch.device("cpu"))
    off.update(torch.tensor([0, 1]))
    assert torch.equal(off(logits), logits)


def test_a_repetition_penalty_makes_greedy_decoding_stop_repeating(tiny_lm):
    from character_baker.backends.generation.decoding import DecodeSettings, generate_decode, static_decode

    model, tokenizer = tiny_lm
    prompt = [tokenizer("Ahoy there, matey!", add_special_tokens=False)["input_ids"]]
    base = dict(temperature=0.0, top_p=1.0, max_new_tokens=24, eos_ids=(), pad_id=0, ignore_eos=True)
    plain = static_decode(model, prompt, DecodeSettings(**base), seed=0)[0].token_ids
    strong = DecodeSettings(**base, repetition_penalty=1e6)
    penalised = static_decode(model, prompt, strong, seed=0)[0].token_ids
    assert len(set(penalised)) == len(penalised) and len(set(plain)) < len(plain)  # a random tiny model loops greedily
    assert generate_decode(model, prompt, strong, seed=0)[0].token_ids == penalised  # both engines, same rule


def test_http_backends_refuse_a_repetition_penalty():
    from pydantic import ValidationError

    from character_baker.core.config import Recipe

    with pytest.raises(ValidationError, match="generation.teacher.sampling.repetition_penalty"):
        Recipe.model_validate({"generation": {"teacher": {"backend": "openai", "sampling": {"repetition_penalty": 1.1}}}})
    Recipe.model_validate({"generation": {"teacher": {"backend": "vllm", "sampling": {"repetition_penalty": 1.1}}}})


@pytest.mark.parametrize("shortcut", [True, False])
def test_rows_with_temperature_zero_are_greedy_whatever_their_top_p(shortcut):
    logits = torch.randn(6, 500, generator=torch.Generator().manual_seed(3))
    temperature = torch.tensor([0.0, 0.0, 0.0, 0.7, 0.0, 1.0])
    top_p = torch.tensor([1.0, 0.95, 0.5, 1.0, 1.0, 0.9])
    tokens = sample_tokens(logits, temperature, top_p, torch.Generator().manual_seed(0), candidate_shortcut=shortcut)
    greedy = temperature == 0
    assert torch.equal(tokens[greedy], logits.argmax(-1)[greedy])
