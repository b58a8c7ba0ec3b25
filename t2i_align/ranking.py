"""Reward-ranked selection of generated samples (RAFT, Dong et al. 2023, Alg. 1 step 4; online DPO pairs).

Scores come as a [P, K] table: K images for each of P prompts. A non-finite score drops that image (counted).
RAFT follows the LMFlow diffusion demo: best-of-K per prompt ("local"), then the prompts with the highest best
scores, a `top_fraction` of them ("global top-k": 8 of 10 in the demo). Online DPO pairs each prompt's best
image with its worst and keeps the prompts with the largest reward gap; a prompt whose images all score the
same carries no preference and is skipped. Ties are broken by position: among equal best (or worst) scores the
lowest k wins, and at the `top_fraction` cut the lower prompt slot.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Dict, List, Tuple

import torch


@dataclass
class Selection:
    """Chosen cells of the [P, K] score table, best prompts first."""

    picks: List[Tuple[int, ...]] = field(default_factory=list)
    """(prompt, k) for RAFT; (prompt, k_best, k_worst) for pairs."""
    dropped_nonfinite: int = 0
    """Images whose score was NaN or infinite (never selected)."""
    prompts_without_choice: int = 0
    """Prompts left with no usable image (RAFT) or no pair with a positive reward gap (pairs)."""


def _num_kept(candidates: int, top_fraction: float) -> int:
    if not 0.0 < top_fraction <= 1.0:
        raise ValueError(f"top_fraction must be in (0, 1], got {top_fraction}")
    # Round half up (Python's round() would send 2.5 to 2), in exact decimal: 0.7 x 45 is 31.499999... in floats
    # and rounded down; never fewer than one.
    kept = math.floor(Fraction(str(top_fraction)) * candidates + Fraction(1, 2))
    return min(candidates, max(1, kept)) if candidates else 0


def _check_table(scores: torch.Tensor, min_k: int) -> torch.Tensor:
    if scores.dim() != 2:
        raise ValueError(f"scores must be a [prompts, K] table, got shape {tuple(scores.shape)}")
    if scores.shape[1] < min_k:
        raise ValueError(f"K = {scores.shape[1]} images per prompt; pairs need K >= 2 (set raft.k >= 2)")
    return scores.detach().double().cpu()


def select_best_of_k(scores: torch.Tensor, top_fraction: float = 1.0) -> Selection:
    """Best image of each prompt, then the `top_fraction` of prompts whose best is highest."""
    s = _check_table(scores, 1)
    finite = torch.isfinite(s)
    best, arg = s.masked_fill(~finite, -math.inf).max(dim=1)
    usable = [p for p in range(s.shape[0]) if finite[p].any()]
    usable.sort(key=lambda p: (-float(best[p]), p))
    kept = usable[:_num_kept(len(usable), top_fraction)]
    return Selection([(p, int(arg[p])) for p in kept], int((~finite).sum()), s.shape[0] - len(usable))


def select_best_worst(scores: torch.Tensor, top_fraction: float = 1.0, min_gap: float = 0.0) -> Selection:
    """(prompt, best, worst) per prompt whose gap exceeds `min_gap` (>= 0: always a positive gap), then the
    `top_fraction` with the largest gaps."""
    s = _check_table(scores, 2)
    finite = torch.isfinite(s)
    best, arg_best = s.masked_fill(~finite, -math.inf).max(dim=1)
    worst, arg_worst = s.masked_fill(~finite, math.inf).min(dim=1)
    gap = best - worst
    usable = [p for p in range(s.shape[0]) if int(finite[p].sum()) >= 2 and float(gap[p]) > max(0.0, min_gap)]
    usable.sort(key=lambda p: (-float(gap[p]), p))
    kept = usable[:_num_kept(len(usable), top_fraction)]
    picks = [(p, int(arg_best[p]), int(arg_worst[p])) for p in kept]
    return Selection(picks, int((~finite).sum()), s.shape[0] - len(usable))


DIVERSITY_SAMPLES = 256
"""A round's diversity is estimated on at most this many samples, evenly spaced: the pairwise distances of a whole
SD-sized round (300 prompts x 16 images: 11.5 million pairs of 16,384-value latents at 512 px) on every process
would cost minutes per round (a reviewer's estimate, not measured here)."""


def spaced(n: int, at_most: int = 0) -> List[int]:
    """Indices of at most `at_most` (> 0) of n items, evenly spaced from the first to the last; all n otherwise."""
    if 0 < at_most < n:
        return torch.linspace(0, n - 1, at_most).round().long().tolist()
    return list(range(n))


def diversity(latents: torch.Tensor, at_most: int = 0) -> float:
    """Mean pairwise RMS distance between samples (0 when fewer than two): falls towards 0 as samples collapse.
    `at_most` > 0: on that many samples at most, evenly spaced through the batch."""
    if len(latents) < 2:
        return 0.0
    flat = latents[spaced(len(latents), at_most)].detach().double().flatten(1)
    return float(torch.pdist(flat).mean() / math.sqrt(flat.shape[1]))


def diversity_cells(prompts: int, k: int) -> List[Tuple[int, int]]:
    """The (prompt, k) cells of a [prompts, K] round whose latents the pool's diversity is measured on."""
    return [divmod(i, k) for i in spaced(prompts * k, DIVERSITY_SAMPLES)]


def _finite_diversity(latents: List[torch.Tensor]) -> float:
    """The diversity of the finite latents (a diverged sample's NaN made the pool's NaN); 0 when fewer than two."""
    kept = [x for x in latents if torch.isfinite(x).all()]
    return diversity(torch.stack(kept)) if len(kept) > 1 else 0.0


def round_metrics(scores: torch.Tensor, latents: Dict[Tuple[int, int], torch.Tensor],
                  selection: Selection) -> Dict[str, float]:
    """What to watch per round: pool reward (mean, max, mean best-of-K), the selected reward, and the diversity
    of the pool and of the selected samples (each on `DIVERSITY_SAMPLES` at most), so reward hacking and collapse
    show up in the logs. `latents`: (prompt, k) -> latent, for the selected cells and `diversity_cells`."""
    s = scores.detach().double().cpu()
    finite = torch.isfinite(s)
    vals = s[finite]
    chosen = [(p, ks[0]) for p, *ks in selection.picks]
    chosen_scores = torch.tensor([float(s[p, k]) for p, k in chosen], dtype=torch.float64)
    out = {
        "raft/pool_reward_mean": float(vals.mean()) if len(vals) else math.nan,
        "raft/pool_reward_max": float(vals.max()) if len(vals) else math.nan,
        "raft/selected_reward_mean": float(chosen_scores.mean()) if len(chosen) else math.nan,
        "raft/selected": float(len(chosen)),
        "raft/pool_diversity": _finite_diversity([latents[c] for c in diversity_cells(*s.shape)]),
        "raft/selected_diversity": diversity(torch.stack([latents[c] for c in chosen]), DIVERSITY_SAMPLES)
        if chosen else 0.0,
        "raft/nonfinite_dropped": float(selection.dropped_nonfinite),
    }
    if selection.picks and len(selection.picks[0]) == 3:
        losers = torch.tensor([float(s[p, w]) for p, _, w in selection.picks], dtype=torch.float64)
        out["raft/selected_loser_reward_mean"] = float(losers.mean())
    return out
