"""RAFT / online-DPO selection on hand-made score tables, and the per-round figures."""
import math

import pytest
import torch

from t2i_align.ranking import diversity, diversity_cells, round_metrics, select_best_of_k, select_best_worst

NAN = float("nan")
# 4 prompts x 3 images. Prompt 1 ties everywhere; prompt 2 has one non-finite score.
SCORES = torch.tensor([[0.2, 0.9, 0.5],
                       [0.1, 0.1, 0.1],
                       [NAN, 0.3, 0.8],
                       [0.6, 0.4, 0.7]])


def test_best_of_k_then_global_top_fraction():
    sel = select_best_of_k(SCORES, top_fraction=1.0)
    # best per prompt: 0.9 (p0,k1), 0.1 (p1), 0.8 (p2,k2), 0.7 (p3,k2); ordered by best score
    assert [p for p, _ in sel.picks] == [0, 2, 3, 1]
    assert sel.picks[:3] == [(0, 1), (2, 2), (3, 2)]
    assert sel.dropped_nonfinite == 1 and sel.prompts_without_choice == 0
    assert select_best_of_k(SCORES, top_fraction=0.5).picks == [(0, 1), (2, 2)]
    assert select_best_of_k(SCORES, top_fraction=0.6).picks == [(0, 1), (2, 2)]  # 2.4 -> 2
    assert select_best_of_k(SCORES, top_fraction=0.625).picks == [(0, 1), (2, 2), (3, 2)]  # 2.5 -> 3
    assert select_best_of_k(SCORES, top_fraction=0.01).picks == [(0, 1)]  # never fewer than one


def test_half_a_prompt_rounds_up_where_floats_fall_short():
    """0.7 x 45 is 31.499999... in floats: 31 prompts were kept, not 32 (13 such cases for fractions 0.01-1.00)."""
    from t2i_align.ranking import _num_kept

    assert [_num_kept(45, 0.7), _num_kept(25, 0.58), _num_kept(50, 0.29)] == [32, 15, 15]
    assert [_num_kept(45, 0.69), _num_kept(0, 0.5), _num_kept(3, 1.0)] == [31, 0, 3]


def test_best_of_k_skips_prompts_without_a_finite_score():
    sel = select_best_of_k(torch.tensor([[NAN, float("inf")], [0.5, 0.2]]))
    assert sel.picks == [(1, 0)]
    assert sel.dropped_nonfinite == 2 and sel.prompts_without_choice == 1


def test_best_worst_pairs_rank_by_gap_and_skip_ties():
    sel = select_best_worst(SCORES, top_fraction=1.0)
    # gaps: p0 0.9-0.2=0.7, p1 0 (no preference: skipped), p2 0.8-0.3=0.5 (NaN ignored), p3 0.7-0.4=0.3
    assert sel.picks == [(0, 1, 0), (2, 2, 1), (3, 2, 1)]
    assert sel.prompts_without_choice == 1 and sel.dropped_nonfinite == 1
    assert select_best_worst(SCORES, top_fraction=0.5).picks == [(0, 1, 0), (2, 2, 1)]  # 1.5 -> 2


def test_a_minimum_gap_drops_near_ties_before_the_top_fraction():
    # gaps 0.7, 0, 0.5, 0.3: above 0.4 only prompts 0 and 2; of those two, top 0.5 keeps one
    sel = select_best_worst(SCORES, top_fraction=1.0, min_gap=0.4)
    assert sel.picks == [(0, 1, 0), (2, 2, 1)] and sel.prompts_without_choice == 2
    assert select_best_worst(SCORES, top_fraction=0.5, min_gap=0.4).picks == [(0, 1, 0)]
    exact = torch.tensor([[0.5, 0.25]])  # a gap of exactly 0.25: "exceed", so equal is not enough
    assert select_best_worst(exact, min_gap=0.25).picks == [] and select_best_worst(exact, min_gap=0.125).picks


def test_pairs_need_two_finite_images_and_k_at_least_two():
    sel = select_best_worst(torch.tensor([[NAN, 0.4, NAN], [0.1, 0.3, 0.2]]))
    assert sel.picks == [(1, 1, 0)]
    with pytest.raises(ValueError, match="K >= 2"):
        select_best_worst(torch.tensor([[0.1], [0.2]]))
    with pytest.raises(ValueError, match=r"\[prompts, K\]"):
        select_best_of_k(torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="top_fraction"):
        select_best_of_k(SCORES, top_fraction=0.0)


def test_diversity_is_mean_pairwise_rms_distance():
    assert diversity(torch.tensor([[0.0, 0.0], [3.0, 4.0]])) == pytest.approx(5 / math.sqrt(2))
    # distances 5, 0, 5 -> mean 10/3, over sqrt(2) elements
    assert diversity(torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])) == pytest.approx(10 / 3 / math.sqrt(2))
    assert diversity(torch.zeros(1, 4)) == 0.0
    # at most 3 of 5, evenly spaced: rows 0, 2, 4 = (0, 0), (0, 0), (3, 4): distances 0, 5, 5
    five = torch.tensor([[0.0, 0.0], [9.0, 9.0], [0.0, 0.0], [9.0, 9.0], [3.0, 4.0]])
    assert diversity(five, at_most=3) == pytest.approx(10 / 3 / math.sqrt(2))
    assert diversity(five, at_most=5) == diversity(five)


def test_diversity_cells_are_evenly_spaced_through_the_round(monkeypatch):
    import t2i_align.ranking as ranking

    assert diversity_cells(2, 3) == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]  # all, under the limit
    monkeypatch.setattr(ranking, "DIVERSITY_SAMPLES", 4)
    # flat positions 0, 11/3, 22/3, 11 of 4 prompts x 3 images, rounded: 0, 4, 7, 11
    assert diversity_cells(4, 3) == [(0, 0), (1, 1), (2, 1), (3, 2)]


def test_round_metrics_by_hand():
    latents = torch.zeros(12, 1, 1, 2)
    latents[1] = torch.tensor([3.0, 4.0]).view(1, 1, 2)  # the selected image of prompt 0 (row 0*3+1)
    latents = {divmod(i, 3): latents[i] for i in range(12)}  # (prompt, k) -> latent
    sel = select_best_of_k(SCORES, top_fraction=0.5)  # (0,1) and (2,2)
    m = round_metrics(SCORES, latents, sel)
    finite = [0.2, 0.9, 0.5, 0.1, 0.1, 0.1, 0.3, 0.8, 0.6, 0.4, 0.7]
    assert m["raft/pool_reward_mean"] == pytest.approx(sum(finite) / 11)
    assert m["raft/pool_reward_max"] == pytest.approx(0.9)
    assert m["raft/selected_reward_mean"] == pytest.approx((0.9 + 0.8) / 2)
    assert m["raft/selected"] == 2 and m["raft/nonfinite_dropped"] == 1
    assert m["raft/selected_diversity"] == pytest.approx(5 / math.sqrt(2))  # rows 1 and 8
    assert m["raft/pool_diversity"] == pytest.approx(5 * 11 / 66 / math.sqrt(2))  # 11 of 66 pairs 5 apart
    pairs = round_metrics(SCORES, latents, select_best_worst(SCORES))
    assert pairs["raft/selected_loser_reward_mean"] == pytest.approx((0.2 + 0.3 + 0.4) / 3)
    latents[(3, 0)] = torch.full((1, 1, 2), math.nan)  # a diverged sample: the pool's diversity was NaN
    m = round_metrics(SCORES, latents, sel)
    assert m["raft/pool_diversity"] == pytest.approx(5 * 10 / 55 / math.sqrt(2))  # 10 of the 55 finite pairs
