"""Judge a model on the toy world's LONG captions (LongAlign's question: does it follow text past 77 tokens?).

Like `evaluate.evaluate` (same DDIM 20 steps, guidance 3, fixed per-prompt seeds), but the prompts are the
six-sentence captions of `prompts.toy_long_captions` (or the short ones), and every image's per-attribute verdict
is kept, so two models judged at the same seeds compare image by image (`compare_records`: per attribute, the
paired difference with a t-test and an exact sign test on the images where exactly one model is right).
Diversity: per prompt, the mean pairwise RMS distance of its seeds' final latents (`ranking.diversity`), then the
mean over prompts (falls if a model collapses onto one image per prompt).
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence

from ..gallery import to_uint8
from ..ranking import diversity
from ..sampling import generate, prompt_major
from ..stats import clustered_diff, holm, mean_ci, paired_diff, sign_test_p
from .evaluate import TOY_GUIDANCE, TOY_STEPS, prompt_set
from .judge import judge_batch
from .scenes import ATTRIBUTES, short_caption


def captions_for(name: str, kind: str) -> List[str]:
    """The `kind` ("long" / "short") captions of prompt set `name`, in `prompt_set(name)` order."""
    from ..prompts import toy_long_captions

    if kind == "long":
        return toy_long_captions(name)
    if kind == "short":
        return [short_caption(s) for s in prompt_set(name)]
    raise ValueError(f"unknown caption kind {kind!r}; use long or short")


def judge_records(pipe, name: str = "heldout", kind: str = "long", seeds_per_prompt: int = 8, base_seed: int = 0,
                  batch_size: int = 120, reward=None, progress: Optional[Callable[[int], object]] = None) -> Dict:
    """Per image (prompt-major: prompt i's seeds are rows i·k .. i·k+k-1): 0/1 correctness per attribute and the
    judge score; per prompt: diversity; with `reward` (a decomposed-clip) its per-image parts too. `progress` is
    called with the number of images finished after each batch (e.g. a tqdm bar's update)."""
    scenes, captions = prompt_set(name), captions_for(name, kind)
    flat, seeds = prompt_major(list(range(len(scenes))), seeds_per_prompt, base_seed)
    samples = generate(pipe, [captions[i] for i in flat], seeds, num_inference_steps=TOY_STEPS,
                       guidance_scale=TOY_GUIDANCE, batch_size=batch_size, progress=progress)
    verdicts = judge_batch(to_uint8(samples.images), [scenes[i] for i in flat])
    k = seeds_per_prompt
    record = {"prompts": name, "captions": kind, "seeds_per_prompt": k, "base_seed": base_seed,
              "correct": {a: [int(v.correct[a]) for v in verdicts] for a in ATTRIBUTES},
              "score": [v.score for v in verdicts],
              "diversity": [diversity(samples.latents[i * k:(i + 1) * k]) for i in range(len(scenes))]}
    if reward is not None:
        _, info = reward(samples.images, [captions[i] for i in flat])
        record["reward"] = {key: info[key] for key in ("total", "relevant", "irrelevant", "weighted")}
        record["reward_omega"] = reward.omega
    return record


def summarize_record(record: Dict) -> Dict:
    """Means with 95 % intervals: overall judge score, each attribute, diversity, reward parts."""
    out = {"overall": mean_ci(record["score"]),
           "per_attribute": {a: mean_ci(v) for a, v in record["correct"].items()},
           "diversity": mean_ci(record["diversity"])}
    if "reward" in record:
        out["reward"] = {key: mean_ci(v) for key, v in record["reward"].items()}
    return out


def _sign(a: Sequence[float], b: Sequence[float]) -> Dict:
    wins = sum(x > y for x, y in zip(a, b))
    losses = sum(x < y for x, y in zip(a, b))
    return {"wins": wins, "losses": losses, "p_value": sign_test_p(wins, losses)}


def _finite(tuned: Sequence[float], base: Sequence[float]):
    """A reward part is NaN for a NaN image: those pairs are dropped, as `compare_scores` does (the judge's 0/1
    values are always finite)."""
    keep = [i for i, (t, b) in enumerate(zip(tuned, base)) if math.isfinite(t) and math.isfinite(b)]
    return [tuned[i] for i in keep], [base[i] for i in keep], keep


def compare_records(tuned: Dict, base: Dict, attributes: Optional[Sequence[str]] = None) -> Dict:
    """tuned − base, image by image (both judged on the same prompts and seeds): per attribute and overall the
    paired mean difference (95 % t-interval, t-test p) and the sign test on images where they differ, and under
    `per_prompt` the same tests with the prompt as the unit (`stats.clustered_diff`: a prompt's seeds are not
    independent; these are the p-values to read)."""
    for key in ("prompts", "captions", "seeds_per_prompt", "base_seed"):
        if tuned[key] != base[key]:
            raise ValueError(f"records differ in {key}: {tuned[key]!r} vs {base[key]!r}; judge both alike")
    groups = [i // tuned["seeds_per_prompt"] for i in range(len(tuned["score"]))]  # prompt-major records

    def both(t, b, keep=None) -> Dict:
        g = groups if keep is None else [groups[i] for i in keep]
        return {**paired_diff(t, b), "sign": _sign(t, b), "per_prompt": clustered_diff(t, b, g)}

    out = {"overall": both(tuned["score"], base["score"])}
    for a in attributes or ATTRIBUTES:
        out[a] = both(tuned["correct"][a], base["correct"][a])
    # the attributes' per-prompt t p-values adjusted for testing them all (they are read as a family in tables)
    out["holm_per_prompt"] = holm({a: out[a]["per_prompt"]["p_value"] for a in attributes or ATTRIBUTES})
    out["diversity"] = paired_diff(tuned["diversity"], base["diversity"])
    same = all(tuned.get(k, d) == base.get(k, d) for k, d in (("reward_checkpoint", "toy"), ("reward_omega", 0.3)))
    if "reward" in tuned and "reward" in base and same:  # the same reward
        out["reward"] = {key: both(*_finite(tuned["reward"][key], base["reward"][key])) for key in tuned["reward"]}
    return out
