"""What a training step minimises: next-token cross-entropy (SFT), DPO or ORPO. One function each.

Every objective maps (the TrainStep, a batch) to (loss_sum, units, metric sums); the loop divides
the loss and the metrics by the units of the whole optimizer step on every rank (train/loop.py: the
one place that normalisation happens), so accumulation and ranks give one big batch's numbers.

    sft   units = supervised tokens    loss_sum = sum_t CE(head(h_t), y_t+1)
    dpo   units = preference pairs     (Rafailov et al. 2023; TRL DPOTrainer's formulas and metric names)
    orpo  units = preference pairs     (Hong et al. 2024; TRL ORPOTrainer's odds ratio)

A preference batch (data/collate.py collate_pairs) holds 2B rows: rows 0..B-1 the chosen answers,
rows B..2B-1 the rejected ones, each with its prompt; `pairs` [B] marks the pairs that count (a
stand-in pair of a distributed short batch has nothing supervised and counts 0). Chosen and rejected
go through the model in one forward. Per sequence s only its answer's log-probability is needed:

    logp_s = sum over the supervised positions t of s of log softmax(head(h_t))[y_t+1]
           = -(the per-token CE of train/loss.py token_losses, summed per row)

so no objective forms [N, V] fp32 logits: the fused head (or the chunked reference) gives per-token
losses and an index_add sums them per row.

DPO, with pi = logp under the adapter, ref = logp with the adapters off (lora/switch.py; no second
model), per pair i, chosen c / rejected r:
    u_i  = (pi_c - ref_c) - (pi_r - ref_r)
    sigmoid  loss_i = -(1 - ls) log sigmoid(beta u_i) - ls log sigmoid(-beta u_i)    (ls: cDPO label
             smoothing; ls = 0 is TRL's "sigmoid")
    ipo      loss_i = ((pi_c - ref_c)/n_c - (pi_r - ref_r)/n_r - 1/(2 beta))^2        (n: answer tokens; TRL "ipo")
    rewards/chosen = beta (pi_c - ref_c), rewards/rejected = beta (pi_r - ref_r), rewards/accuracies =
    [chosen reward > rejected reward], rewards/margins = their difference, logps/chosen = pi_c, ...
The reference pass runs first, under no_grad, in eval mode (no dropout, no NEFTune noise, no
checkpointing) so it holds no activations when the policy's forward starts; with
train.precompute_ref_logps the batch carries ref once computed per example (`ref_logps`).

ORPO, with a_s = logp_s / n_s the mean log-probability per answer token:
    log_odds_i = (a_c - a_r) - (log(1 - exp a_c) - log(1 - exp a_r))
    loss = NLL_chosen - lambda * mean_i log sigmoid(log_odds_i)
where NLL_chosen is the mean CE per chosen answer token of the micro-batch (the paper's L_SFT;
TRL's experimental ORPOTrainer also supervises the prompt tokens there). As a sum over pairs for the
loop: B * NLL_chosen - lambda * sum_i log sigmoid(log_odds_i), units B. rewards/* = lambda * a.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.tokenize import IGNORE_INDEX
from ..lora.switch import adapters_disabled
from .loss import token_losses

OBJECTIVES = ("sft", "dpo", "orpo")
DPO_LOSSES = ("sigmoid", "ipo")


def loss_units(batch: dict) -> int:
    """The loss's denominator for a host-side batch: preference pairs (DPO / ORPO) or supervised tokens."""
    if "pairs" in batch:
        return int(batch["pairs"].sum())
    return int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())


def sequence_logps(step, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """(logp [R] fp32, answer tokens [R]) of every row of the batch: the sum of its supervised
    tokens' log-probabilities (module docstring), and how many there are."""
    hidden = step.hidden_states(batch)                                         # [R, T, H]
    losses, rows = token_losses(step.model, hidden, batch["labels"], step.loss_chunk_size, step.fused_loss)
    n_rows = batch["labels"].shape[0]
    logp = torch.zeros(n_rows, dtype=torch.float32, device=losses.device).index_add(0, rows, -losses)  # [R]
    return logp, torch.bincount(rows, minlength=n_rows)                        # [R], [R]


@torch.no_grad()
def reference_logps(step, batch: dict) -> torch.Tensor:
    """sequence_logps of the base model: adapters off, eval mode (module docstring); [R] fp32."""
    model = step.model
    was_training = model.training
    model.eval()
    try:
        with adapters_disabled(model):
            return sequence_logps(step, batch)[0]
    finally:
        model.train(was_training)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, without cancellation (Maechler 2012: two branches at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


class SFT:
    """Next-token cross-entropy over the supervised tokens (train/loss.py)."""

    name = "sft"
    needs_reference = False

    def __call__(self, step, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        hidden = step.hidden_states(batch)                                     # [B, T, H]
        losses, _ = token_losses(step.model, hidden, batch["labels"], step.loss_chunk_size, step.fused_loss)
        return losses.sum(), (batch["labels"][:, 1:] != IGNORE_INDEX).sum(), {}


class DPO:
    """Direct preference optimisation against the adapter-free base (module docstring)."""

    name = "dpo"
    needs_reference = True

    def __init__(self, beta: float = 0.1, loss_type: str = "sigmoid", label_smoothing: float = 0.0):
        self.beta, self.loss_type, self.label_smoothing = beta, loss_type, label_smoothing

    def __call__(self, step, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        ref = batch["ref_logps"] if "ref_logps" in batch else reference_logps(step, batch)  # [2B], first: no activations held
        policy, n_tokens = sequence_logps(step, batch)                                       # [2B], [2B]
        pi_c, pi_r = policy.chunk(2)
        ref_c, ref_r = ref.float().chunk(2)
        chosen, rejected = pi_c - ref_c, pi_r - ref_r                                        # log-ratios [B]
        if self.loss_type == "ipo":
            n_c, n_r = n_tokens.clamp(min=1).chunk(2)
            losses = (chosen / n_c - rejected / n_r - 1 / (2 * self.beta)) ** 2
        else:
            u = self.beta * (chosen - rejected)
            losses = -(1 - self.label_smoothing) * F.logsigmoid(u) - self.label_smoothing * F.logsigmoid(-u)
        w = batch["pairs"].to(losses.dtype)                                                  # [B]
        stats = pair_metrics(self.beta * chosen.detach(), self.beta * rejected.detach(), pi_c.detach(), pi_r.detach(), w)
        return (losses * w).sum(), w.sum(), stats


class ORPO:
    """Odds-ratio preference optimisation: SFT on the chosen answer plus an odds-ratio term, no reference."""

    name = "orpo"
    needs_reference = False

    def __init__(self, lam: float = 0.1):
        self.lam = lam

    def __call__(self, step, batch: dict) -> tuple[torch.Tensor, torch.Tensor, dict]:
        policy, n_tokens = sequence_logps(step, batch)                                       # [2B], [2B]
        w = batch["pairs"].to(policy.dtype)                                                  # [B]
        n_c, n_r = n_tokens.chunk(2)
        mean = torch.where(n_tokens > 0, policy / n_tokens.clamp(min=1), -1.0)               # a [2B]; -1 for a stand-in
        mean_c, mean_r = mean.chunk(2)                                                       # (log1mexp(0) = -inf)
        pi_c = policy.chunk(2)[0]
        nll = -(pi_c * w).sum() / (n_c * w).sum().clamp(min=1)                                # mean CE per chosen token
        log_odds = (mean_c - mean_r) - (log1mexp(mean_c) - log1mexp(mean_r))                 # [B]
        ratio = F.logsigmoid(log_odds)
        loss_sum = w.sum() * nll - self.lam * (ratio * w).sum()
        stats = pair_metrics(self.lam * mean_c.detach(), self.lam * mean_r.detach(), mean_c.detach(), mean_r.detach(), w)
        stats.update({"nll_loss": nll.detach() * w.sum(), "log_odds_ratio": (ratio.detach() * w).sum(),
                      "log_odds_chosen": (log_odds.detach() * w).sum()})
        return loss_sum, w.sum(), stats


def pair_metrics(reward_c, reward_r, logp_c, logp_r, w) -> dict:
    """TRL's metric names, as sums over the counted pairs (the loop divides by their number)."""
    return {"rewards/chosen": (reward_c * w).sum(), "rewards/rejected": (reward_r * w).sum(),
            "rewards/accuracies": ((reward_c > reward_r).to(w.dtype) * w).sum(),
            "rewards/margins": ((reward_c - reward_r) * w).sum(),
            "logps/chosen": (logp_c * w).sum(), "logps/rejected": (logp_r * w).sum()}


def build_objective(tc):
    """The objective train.objective names, with its train.* parameters (config.py checks them)."""
    if tc.objective == "dpo":
        return DPO(tc.dpo_beta, tc.dpo_loss, tc.dpo_label_smoothing)
    if tc.objective == "orpo":
        return ORPO(tc.orpo_lambda)
    return SFT()
