"""Exact temperature + top-p sampling that never sorts the vocabulary: every decode path calls it.

    tokens = sample_tokens(logits, temperature=0.7, top_p=0.95, generator=generator)
    tokens = sample_tokens(logits, temperature=row_temperatures, top_p=row_top_ps)   # [batch] tensors

The distribution, per row: greedy (argmax) where temperature <= 0; otherwise q = softmax(logits / T),
restricted to the nucleus (in descending order of q, every token whose predecessors hold less than
top_p of the mass; the most probable token always; everything when top_p >= 1), renormalised. This
is the distribution the sort-based sampler this module replaced drew from (`torch.sort`, masked
cumsum, exponential race). What changed is how the nucleus is found and how a token is drawn:

1. Candidates (CPU, `candidate_shortcut`): the `CANDIDATES` most probable tokens by `topk`, with
   exact probabilities (the normaliser is summed over the whole vocabulary). Where their mass
   reaches top_p (and no tie straddles the boundary) the nucleus lies inside them, exactly as a
   full sort would find it. Rows whose top_p mass exceeds what CANDIDATES tokens can hold skip it.
2. Rejection (CPU, the rows step 1 does not cover): propose a token from the whole distribution,
   keep it when the tokens more probable than it hold less than top_p. A round accepts with
   probability >= top_p; `REJECTION_ROUNDS` rounds, then step 3 for what is left.
3. Threshold search (what is left; every row on a GPU): the nucleus is {q > tau} plus the tokens
   tied at tau, where tau is the last kept probability. Non-negative float32 values order like
   their bit patterns, so tau is found digit by digit (radix select): a mass histogram over the
   top 12 bits, a cumulative sum from the top, the bin where the mass crosses top_p, then the
   same over the next 10 bits inside that bin, and the last 10. Three passes over the vocabulary,
   fixed work, no data-dependent branch, exact (float32 sums, like the sort's cumsum).
4. Drawing: inverse CDF with one uniform per row, in float64, in two levels (chunk masses, then
   one chunk), instead of `torch.multinomial` or one exponential variate per vocabulary entry.

Ties: where n tokens tie at the boundary and the rule keeps c of them, a sort keeps whichever c
its order leaves first; here each tied token is kept with probability c / n (a uniformly random
choice of the c). Probabilities below float32's smallest normal number count as 0.

Nothing reads a tensor on the host except the CPU steps' choice of which rows go on (on a CPU
the tensor already lives on the host): the GPU path never waits for the device. On one CPU
thread with 64 rows over SmolLM2's 49,152 tokens, a call costs 17-70 ms where the sort-based
sampler cost 350-700 ms (docs/performance.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

CANDIDATES = 64  # tokens tried by the CPU shortcut; a peaked model's nucleus at T=0.7, top_p=0.95 is a handful
REJECTION_ROUNDS = 4  # CPU: proposals per row before the threshold search; each is accepted with prob >= top_p
CHUNK = 256  # vocabulary entries per chunk of the two-level inverse CDF
UNDERFLOW = -87.0  # log of float32's smallest normal number is -87.3
SMALLEST_WEIGHT = float(torch.tensor(UNDERFLOW).exp())  # exp(UNDERFLOW) in float32: weights at or below it are 0
DIGIT_BINS = 1 << 10  # radix select: the top 12 bits of a float32 in [0, 1] are <= 0x3F8 (sign 0, exponent
DIGIT_MASK = DIGIT_BINS - 1  # <= 127), so bits 31..20, 19..10 and 9..0 each fit 1024 bins


def sample_tokens(logits: torch.Tensor, temperature: float | torch.Tensor, top_p: float | torch.Tensor,
                  generator: torch.Generator | None = None, *,
                  candidate_shortcut: bool | None = None) -> torch.Tensor:
    """Next token per row of [batch, vocab] logits from the exact temperature + top-p distribution.

    `temperature` and `top_p` are floats or [batch] tensors (rows with temperature <= 0 are greedy).
    `candidate_shortcut` (default: on a CPU only) tries the top-k candidates first and sends only the
    rows they do not cover through the threshold search; choosing those rows reads a tensor on the
    host, which on a GPU would wait for the device, so there every row takes the threshold search.
    """
    if not isinstance(temperature, torch.Tensor) and temperature <= 0:
        return logits.argmax(dim=-1)
    rows = logits.shape[0]
    temperature = per_row(temperature, rows, logits.device)
    top_p = per_row(top_p, rows, logits.device)
    greedy = temperature <= 0
    logits = logits.float()
    weights = (logits - logits.amax(dim=-1, keepdim=True)).mul_(1 / torch.where(greedy, 1.0, temperature)[:, None])
    # Unnormalised q, the largest 1. What falls below float32's smallest normal number (e**-87)
    # counts as 0 (masked -inf logits too): denormal and infinite inputs make a CPU's `exp` 4-10x
    # slower, and the mass dropped is below 1e-33.
    weights = F.threshold_(weights.clamp_(min=UNDERFLOW).exp_(), SMALLEST_WEIGHT, 0.0)
    # Nucleus mass in the same units: top_p of the total; 0 for greedy rows (the top token is always
    # kept); infinite where top_p >= 1 (everything is kept).
    target = torch.where(greedy, 0.0, torch.where(top_p >= 1, torch.inf, top_p * weights.sum(dim=-1)))
    shortcut = logits.device.type == "cpu" if candidate_shortcut is None else candidate_shortcut
    if not shortcut:
        return sample_nucleus(weights, target, generator)
    if bool(torch.isinf(target).all()):  # top_p >= 1 everywhere: no nucleus to find
        return inverse_cdf(weights, generator)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    covered = torch.zeros(rows, dtype=torch.bool, device=logits.device)
    # CANDIDATES tokens of weight <= 1 hold at most CANDIDATES: rows whose target is larger skip the topk.
    hopeful = (target <= CANDIDATES).nonzero().squeeze(1)
    if len(hopeful):
        tokens[hopeful], covered[hopeful] = sample_candidates(_rows(weights, hopeful), target[hopeful], generator)
    rest = (~covered).nonzero().squeeze(1)
    if len(rest):
        tokens[rest] = sample_by_rejection(_rows(weights, rest), target[rest], generator)
    return tokens


def _count(mask: torch.Tensor) -> torch.Tensor:
    """True entries per row of a [rows, n] bool mask, as float32 (summed as bytes: 4x faster than bool on a CPU)."""
    return mask.view(torch.uint8).sum(dim=-1, dtype=torch.int32).float()


def _rows(tensor: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """`tensor[rows]`, without the copy when `rows` is every row in order."""
    return tensor if len(rows) == len(tensor) else tensor[rows]


def per_row(value: float | torch.Tensor, rows: int, device: torch.device) -> torch.Tensor:
    """A float or a [rows] tensor as a float32 [rows] tensor on `device`."""
    if not isinstance(value, torch.Tensor):
        return torch.full((rows,), float(value), device=device)
    if value.shape != (rows,):
        raise ValueError(f"expected a float or a [{rows}] tensor, got shape {tuple(value.shape)}")
    return value.to(device=device, dtype=torch.float32)


def sample_candidates(weights: torch.Tensor, target: torch.Tensor,
                      generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(token per row drawn from the nucleus within the top-k candidates, whether they hold it all)."""
    top_weights, top_ids = weights.topk(min(CANDIDATES, weights.shape[-1]), dim=-1)  # sorted, descending
    keep = top_weights.cumsum(dim=-1) - top_weights < target[:, None]
    keep[:, 0] = True
    # Covered: the first candidate left out exists and is less probable than the last one kept, so
    # everything after it is out too and no tie straddles the boundary (ties go to the rejection path).
    kept = keep.sum(dim=-1, keepdim=True)
    last_kept, first_out = top_weights.gather(1, kept - 1), top_weights.gather(1, kept.clamp(max=keep.shape[1] - 1))
    covered = ((kept < keep.shape[1]) & (first_out < last_kept)).squeeze(1)
    choice = inverse_cdf(top_weights * keep, generator)
    return top_ids.gather(1, choice[:, None]).squeeze(1), covered


def sample_by_rejection(weights: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Token per row from the nucleus: propose from the whole distribution, keep it if it lies inside.

    A proposal x is inside when the tokens more probable than it hold less than `target` (for ties,
    with the probability `nucleus_threshold` gives them), so an accepted proposal follows the nucleus
    distribution exactly and a round accepts with probability >= top_p. Rows still rejected after
    `REJECTION_ROUNDS` rounds (small top_p over a flat distribution) take the threshold search.
    Deciding which rows go on reads a tensor on the host: a CPU path.
    """
    tokens = torch.empty(len(weights), dtype=torch.long, device=weights.device)
    pending = torch.arange(len(weights), device=weights.device)
    for _ in range(REJECTION_ROUNDS):
        rows = _rows(weights, pending)
        proposal = inverse_cdf(rows, generator)
        value = rows.gather(1, proposal[:, None])
        greater = _count(rows > value)
        above = (rows - value).clamp_(min=0).sum(dim=-1) + value.squeeze(1) * greater  # mass of w > value
        ties = _count(rows == value)
        kept = torch.ceil((target[pending] - above) / value.squeeze(1)).clamp_(min=0).minimum(ties)
        kept = torch.where(above == 0, kept.clamp(min=1), kept)  # a most probable token is always kept
        accepted = torch.rand(len(pending), generator=generator, device=weights.device) * ties < kept
        tokens[pending[accepted]] = proposal[accepted]
        pending = pending[~accepted]
        if not len(pending):
            return tokens
    tokens[pending] = sample_nucleus(weights[pending], target[pending], generator)
    return tokens


def sample_nucleus(weights: torch.Tensor, target: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Token per row drawn from the nucleus over the whole vocabulary (threshold search, no sort)."""
    threshold, tie_weight = nucleus_threshold(weights, target)
    threshold, tie_weight = threshold[:, None], tie_weight[:, None]
    kept = torch.where(weights > threshold, weights, torch.where(weights == threshold, tie_weight, 0.0))
    return inverse_cdf(kept, generator)


def nucleus_threshold(weights: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tau, weight of each token equal to tau) per row: the nucleus is {w > tau} plus the ties at tau.

    tau is the value w of the token at which the mass, summed in descending order, first reaches
    `target`; found by radix select over the float32 bit patterns (non-negative floats order like
    their bits), 12 + 10 + 10 bits. A target above the total (top_p >= 1, or rounding) gives tau = 0.
    A sort keeps the first c of n tokens tied at tau in whatever order it leaves ties; every order
    is equally likely to be the sort's, so each tied token is kept with probability c / n, which is
    the weight tau * c / n given to each of them here.
    """
    bits = weights.view(torch.int32).long()
    top, middle = bits >> 20, bits >> 10  # top 12 bits (<= 0x3F8: no mask needed), top 22 bits
    digit, above = _boundary_bin(top, weights, target, torch.zeros_like(target))
    prefix = digit
    digit, above = _boundary_bin(middle & DIGIT_MASK, torch.where(top == prefix[:, None], weights, 0.0), target, above)
    prefix = (prefix << 10) | digit
    digit, above = _boundary_bin(bits & DIGIT_MASK, torch.where(middle == prefix[:, None], weights, 0.0), target, above)
    threshold = ((prefix << 10) | digit).to(torch.int32).view(torch.float32)
    ties = (weights == threshold[:, None]).sum(dim=-1).float()
    kept = torch.ceil((target - above) / threshold).clamp_(min=1).minimum(ties)
    return threshold, torch.where(threshold > 0, threshold * kept / ties, threshold)


def _boundary_bin(digits: torch.Tensor, weights: torch.Tensor, target: torch.Tensor,
                  above: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(digit where the mass, summed from the highest digit down, first reaches target; the mass above it).

    `above` is the mass of every value above this digit's range (fixed by the earlier digits).
    """
    histogram = weights.new_zeros(weights.shape[0], DIGIT_BINS).scatter_add_(1, digits, weights)
    from_top = histogram.flip(-1).cumsum_(dim=-1).add_(above[:, None])  # mass of the digits >= each digit
    # A target of 0 (greedy) still needs the first digit holding mass: compare with the smallest positive float.
    reach = target.clamp(min=torch.finfo(torch.float32).tiny)[:, None]
    position = (from_top < reach).sum(dim=-1).clamp_(max=DIGIT_BINS - 1)
    digit = DIGIT_BINS - 1 - position
    return digit, from_top.gather(1, position[:, None]).squeeze(1) - histogram.gather(1, digit[:, None]).squeeze(1)


def inverse_cdf(weights: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Index per row drawn with probability proportional to the non-negative [rows, n] weights.

    One uniform per row, float64 cumulative sums, two levels (chunk masses, then inside one chunk),
    so the work is two passes over the weights and never an [rows, n] float64 tensor.
    """
    rows, size = weights.shape
    chunk = min(CHUNK, size)
    chunks = -(-size // chunk)
    padded = (F.pad(weights, (0, chunks * chunk - size)) if chunks * chunk > size else weights).view(rows, chunks, chunk)
    chunk_mass = padded.sum(dim=-1).double()  # float32 sums of CHUNK entries; float64 from here on
    chunk_cdf = chunk_mass.cumsum(dim=-1)
    uniform = torch.rand((rows, 1), generator=generator, device=weights.device, dtype=torch.float64)
    point = _below(uniform * chunk_cdf[:, -1:], chunk_cdf[:, -1:])
    which = torch.searchsorted(chunk_cdf, point, right=True).clamp_(max=chunks - 1)
    before = F.pad(chunk_cdf, (1, 0)).gather(1, which)  # the same sums searchsorted compared with
    point = point - before
    inside = padded.gather(1, which[:, :, None].expand(-1, -1, chunk)).squeeze(1).cumsum(dim=-1, dtype=torch.float64)
    offset = torch.searchsorted(inside, _below(point, inside[:, -1:]), right=True).clamp_(max=chunk - 1)
    return (which * chunk + offset).squeeze(1)


def _below(point: torch.Tensor, total: torch.Tensor) -> torch.Tensor:
    """`point` kept strictly below `total`, so a right-sided search lands on an entry with weight."""
    return torch.minimum(point, torch.nextafter(total, torch.zeros_like(total)))


class RepetitionPenalty:
    """The CTRL repetition penalty (Keskar et al. 2019) over the tokens a row has *generated* so far.

    A logit of a token the row already produced is divided by `penalty` when positive and
    multiplied by it when negative (as transformers' RepetitionPenaltyLogitsProcessor does).
    Unlike transformers and vLLM, prompt tokens are not penalised: a character card's own words
    ("arr", "matey") must stay as likely as the card makes them. `penalty` 1 changes nothing.
    """

    def __init__(self, batch: int, vocab: int, penalty: float, device: torch.device):
        self.penalty = float(penalty)
        self.seen = torch.zeros((batch, vocab), dtype=torch.bool, device=device)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """[batch, vocab] logits with the penalty applied where a token was already generated."""
        if self.penalty == 1.0:
            return logits
        penalised = torch.where(logits > 0, logits / self.penalty, logits * self.penalty)
        return torch.where(self.seen[:, :logits.shape[-1]], penalised, logits)

    def update(self, tokens: torch.Tensor) -> None:
        """Record each row's newly generated token ([batch])."""
        if self.penalty != 1.0:
            self.seen.scatter_(1, tokens[:, None].clamp(max=self.seen.shape[1] - 1), True)
