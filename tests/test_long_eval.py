"""`compare_records` (t2i_align/toy/long_eval.py), the image-by-image comparison behind README's LongAlign table,
on four hand-made images."""
import pytest

from t2i_align.toy.long_eval import compare_records
from t2i_align.toy.scenes import ATTRIBUTES


def _record(score, background, reward_total=None, checkpoint=None):
    record = {"prompts": "heldout", "captions": "long", "seeds_per_prompt": 2, "base_seed": 0, "score": score,
              "correct": {a: background if a == "background" else [1, 1, 1, 1] for a in ATTRIBUTES},
              "diversity": [0.5, 0.5]}
    if reward_total is not None:
        record["reward"] = {"total": reward_total}
        record["reward_checkpoint"] = checkpoint
    return record


def test_compare_records_by_hand():
    tuned = _record([0.8, 0.6, 0.6, 1.0], [1, 1, 0, 1], [0.3, 0.2, 0.2, 0.5], "toy-denscore")
    base = _record([0.6, 0.6, 0.8, 0.8], [0, 1, 1, 0], [0.1, 0.2, 0.1, 0.4], "toy-denscore")
    out = compare_records(tuned, base)
    # score differences 0.2, 0, -0.2, 0.2: mean 0.05; one tie, so the sign test sees 2 wins and 1 loss: p = 1
    assert out["overall"]["mean_diff"] == pytest.approx(0.05)
    assert out["overall"]["sign"] == {"wins": 2, "losses": 1, "p_value": 1.0}
    # background +1, 0, -1, +1: mean 0.25; sd = √(2.75/3), t = 0.25 / (sd / 2) = 0.522
    assert out["background"]["mean_diff"] == pytest.approx(0.25)
    assert out["background"]["t"] == pytest.approx(0.25 / ((2.75 / 3) ** 0.5 / 2))
    assert out["color"]["mean_diff"] == 0.0 and out["color"]["p_value"] == 1.0
    assert out["reward"]["total"]["mean_diff"] == pytest.approx(0.1)  # 0.2, 0, 0.1, 0.1
    # per prompt (2 seeds each): background (+1, 0) -> 0.5 and (-1, +1) -> 0: mean 0.25, se 0.25, t = 1 with df 1,
    # p = 1 - (2/π)·atan(1) = 0.5; the sign test sees 1 prompt won, 1 tied: p = 1
    per_prompt = out["background"]["per_prompt"]
    assert per_prompt["groups"] == 2 and per_prompt["t"] == pytest.approx(1.0)
    assert per_prompt["p_value"] == pytest.approx(0.5) and per_prompt["sign"] == {"wins": 1, "losses": 0,
                                                                                  "p_value": 1.0}
    assert out["overall"]["per_prompt"]["mean_diff"] == pytest.approx(0.05)  # (0.2, 0) -> 0.1, (-0.2, 0.2) -> 0
    # Holm over the attributes: background's 0.5 is the only p below 1, times the 5 attributes: capped at 1
    assert out["holm_per_prompt"] == {a: 1.0 for a in ATTRIBUTES}


def test_rewards_of_different_models_are_not_compared():
    tuned = _record([1, 1, 1, 1], [1, 1, 1, 1], [0.3, 0.2, 0.2, 0.5], "toy-denscore")
    base = _record([1, 1, 1, 1], [1, 1, 1, 1], [0.1, 0.2, 0.1, 0.4], None)  # older records: the toy CLIP
    base["reward_checkpoint"] = "toy"
    assert "reward" not in compare_records(tuned, base)
    base["reward_checkpoint"], base["reward_omega"] = "toy-denscore", 1.0  # another ω is another reward
    assert "reward" not in compare_records(tuned, base)


def test_a_nan_reward_drops_its_pair_and_keeps_the_prompts_aligned():
    """A NaN image's reward parts are NaN: the comparison raised; now the pair is dropped, as compare_scores does."""
    nan = float("nan")
    tuned = _record([1, 1, 1, 1], [1, 1, 1, 1], [0.3, nan, 0.2, 0.5], "toy-denscore")
    base = _record([1, 1, 1, 1], [1, 1, 1, 1], [0.1, 0.2, 0.3, 0.1], "toy-denscore")
    total = compare_records(tuned, base)["reward"]["total"]
    # kept: +0.2 (prompt 0), -0.1 and +0.4 (prompt 1): per prompt 0.2 and 0.15
    assert total["n"] == 3 and total["mean_diff"] == pytest.approx(0.5 / 3)
    assert total["per_prompt"]["groups"] == 2 and total["per_prompt"]["mean_diff"] == pytest.approx(0.175)


def test_records_judged_differently_refuse_to_compare():
    tuned, base = _record([1, 1, 1, 1], [1, 1, 1, 1]), _record([1, 1, 1, 1], [1, 1, 1, 1])
    base["base_seed"] = 100000
    with pytest.raises(ValueError, match="records differ in base_seed"):
        compare_records(tuned, base)
