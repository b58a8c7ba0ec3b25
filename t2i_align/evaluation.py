"""Sample a model at fixed seeds, score the images, and compare a tuned model with its base (sample/*.py).

Both models see the same prompts and the same per-image seeds (`sampling.seeds_for`), so scores are paired:
the comparison reports each model's mean with a 95 % interval, the win rate of tuned over base (ties count
half; Wilson interval; sign-test p), the paired mean difference (t-test p) and, with several seeds per prompt, both
tests with the prompt as the unit (`per_prompt`).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Sequence

from .errors import UserError
from .sampling import Samples, generate, load_pipeline, prompt_major
from .stats import clustered_diff, holm, mean_ci, paired_diff, sign_test_p, win_counts, win_rate


@dataclass
class SampleSettings:
    seeds_per_prompt: int = 4
    seed: int = 0
    """Base seed: image k of prompt i uses seed + 10000·k + i."""
    scheduler: Optional[str] = None
    """"ddim", "dpm++", "euler" or None (the model folder's own)."""
    steps: int = 20
    guidance: float = 3.0
    batch_size: int = 32
    negative_prompt: Optional[str] = None
    height: Optional[int] = None
    width: Optional[int] = None
    dtype: str = "fp32"
    """Every part of the pipeline in this dtype ("fp16" / "bf16" sample faster on a GPU)."""
    variant: Optional[str] = None
    """Weight files to load ("fp16": `*.fp16.safetensors`) from a model folder holding them; others load their plain
    weights."""
    vae: Optional[str] = None
    """A VAE to decode with instead of each model folder's (a run's `model.vae`, which its LoRA export records)."""

    def as_dict(self) -> Dict:
        return asdict(self)


def sample_model(model: str, lora: Optional[str], prompts: Sequence[str], settings: SampleSettings,
                 device: str = "cpu", text_encoding: Optional[str] = None, user=None, on_batch=None,
                 first: int = 0) -> Samples:
    """`seeds_per_prompt` images of every prompt, prompt-major (prompt i's images are rows i·k .. i·k + k-1).
    `text_encoding` None: the one recorded with the weights, else clip77 (see `sampling.load_pipeline`).
    `user` (a `t2i_align.users.inference.UserChoice`): who a model with a PPD user branch samples for.
    `on_batch`: each batch's Samples as it is made, the images then not kept (`sampling.generate`).
    `first`: start at that image of the prompt-major list (a resumed `generate.py`; same seeds as an uninterrupted
    run, each image having its own generator)."""
    from .users.inference import UserChoice, user_tokens_for

    pipe = load_pipeline(model, lora=lora, device=device, scheduler=settings.scheduler, text_encoding=text_encoding,
                         dtype=settings.dtype, variant=settings.variant, vae=settings.vae)
    flat, seeds = prompt_major(prompts, settings.seeds_per_prompt, settings.seed)
    flat, seeds = flat[first:], seeds[first:]
    # the user table beside the weights the branch came from: the model's folder as loaded (`~/m`, a hub id)
    tokens = user_tokens_for(pipe, user or UserChoice(), len(flat), (lora, pipe.name_or_path))
    return generate(pipe, flat, seeds, num_inference_steps=settings.steps, guidance_scale=settings.guidance,
                    batch_size=settings.batch_size, negative_prompt=settings.negative_prompt,
                    height=settings.height, width=settings.width, user_tokens=tokens, on_batch=on_batch)


def score_samples(samples: Samples, rewards: Dict[str, object]) -> Dict[str, List[float]]:
    """Reward name -> one score per image (NaN where the reward gave a non-finite score)."""
    out = {}
    for name, reward in rewards.items():
        scores = reward(samples.images, samples.prompts)[0].detach().float().cpu().tolist()
        out[name] = [s if math.isfinite(s) else math.nan for s in scores]
    return out


class TooFewScores(UserError, ValueError):
    """Fewer than two image pairs with finite scores on both sides: nothing to compare."""


def compare_scores(base: Sequence[float], tuned: Sequence[float], groups: Optional[Sequence] = None) -> Dict:
    """Paired comparison of tuned against base; pairs where either score is non-finite are dropped, counted.
    `groups` (each image's prompt): with several images per prompt, `per_prompt` holds the paired t-test and the
    sign test over the prompts' mean differences (`stats.clustered_diff`), the p-values to read: a prompt's
    images at several seeds are not independent, and the image-level p-values overstate the evidence."""
    if len(base) != len(tuned) or (groups is not None and len(groups) != len(base)):
        raise ValueError(f"compare_scores needs paired scores and one group each, got {len(base)} base, "
                         f"{len(tuned)} tuned, {'no' if groups is None else len(groups)} groups")
    keep = [i for i in range(len(base)) if math.isfinite(base[i]) and math.isfinite(tuned[i])]
    # an image only one side could not be scored for (NaN pixels: a diverged model) is that side's loss: dropped,
    # a model broken on half the prompts won on the rest alone
    broken = {side: [i for i in range(len(base)) if not math.isfinite(mine[i]) and math.isfinite(other[i])]
              for side, mine, other in (("base", base, tuned), ("tuned", tuned, base))}
    if len(keep) < 2:
        raise TooFewScores(f"only {len(keep)} of {len(base)} image pairs have finite scores (base alone failed on "
                           f"{len(broken['base'])}, tuned alone on {len(broken['tuned'])}); a comparison needs at "
                           "least 2: sample more images (--seeds-per-prompt, more prompts), use a reward that "
                           "scores these prompts (toy-judge reads only toy captions), or look at the failed images")
    b, t = [base[i] for i in keep], [tuned[i] for i in keep]
    w = win_rate(t, b)
    out = {"base": mean_ci(b), "tuned": mean_ci(t), "paired_diff": paired_diff(t, b),
           "win_rate": win_counts(w["wins"] + len(broken["base"]), w["losses"] + len(broken["tuned"]), w["ties"]),
           "dropped_nonfinite": len(base) - len(keep), "nonfinite_only": {s: len(v) for s, v in broken.items()}}
    if groups is not None:
        per_prompt = _per_prompt(base, tuned, groups, keep, broken)
        if per_prompt is not None:
            out["per_prompt"] = per_prompt
    return out


def _per_prompt(base, tuned, groups, keep, broken) -> Optional[Dict]:
    """`stats.clustered_diff` over the prompts, when there are several with several images each. A prompt only one
    side failed on (`broken`) is that side's loss in the sign test; the t-test and rates cover the others."""
    lost = {side: {groups[i] for i in v} for side, v in broken.items()}
    decided = lost["base"] ^ lost["tuned"]
    kept = [i for i in keep if groups[i] not in decided]
    g = [groups[i] for i in kept]
    if not 2 <= len(set(g)) < len(g):  # several prompts, some with several images
        return None
    out = clustered_diff([tuned[i] for i in kept], [base[i] for i in kept], g)
    wins, losses = out["sign"]["wins"] + len(lost["base"] - lost["tuned"]), \
        out["sign"]["losses"] + len(lost["tuned"] - lost["base"])
    out["sign"] = {"wins": wins, "losses": losses, "p_value": sign_test_p(wins, losses)}
    out["decided_by_nonfinite"] = {"base": len(lost["base"] - lost["tuned"]),
                                   "tuned": len(lost["tuned"] - lost["base"])}
    return out


def holm_over_rewards(results: Dict[str, Dict]) -> Dict[str, Any]:
    """Each test's p-values over several rewards (`compare_scores` results by name) Holm-adjusted as one family
    (Holm 1979): read together, the smallest of m p-values overstates the evidence. The prompt-level p-values
    when every reward has them (`per_prompt`), else the image-level ones of every reward: one family, one unit,
    named in `unit` ("prompt" or "image")."""
    per_prompt = all("per_prompt" in r for r in results.values())

    def t_test(r: Dict) -> Dict:
        return r["per_prompt"] if per_prompt else r["paired_diff"]

    def degenerate(r: Dict) -> bool:  # every difference equal: t is null
        t = t_test(r).get("t")
        return isinstance(t, float) and math.isnan(t)

    def tests(r: Dict) -> Dict[str, float]:
        sign = r["per_prompt"]["sign"]["p_value"] if per_prompt else r["win_rate"]["p_value"]
        # the degenerate t-test's p of 0 is a limit, not evidence (3 prompts at +0.2 each), and as the family's
        # smallest it lowered every other reward's adjustment: the sign test's p stands in
        return {"t_test": sign if degenerate(r) else t_test(r)["p_value"], "sign_test": sign}

    raw = {name: tests(r) for name, r in results.items()}
    adjusted: Dict[str, Any] = {test: holm({name: p[test] for name, p in raw.items()})
                                for test in ("t_test", "sign_test")}
    stand_ins = sorted(name for name, r in results.items() if degenerate(r))
    return {**adjusted, "unit": "prompt" if per_prompt else "image",
            **({"t_test_from_sign_test": stand_ins} if stand_ins else {})}
