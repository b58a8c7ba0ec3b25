"""Judging stage of benchmarks/toy_ppd.py: held-out toy users, per-user and per-image statistics, interpolation.

For every held-out user u (embedded from 4 shots, never trained on) and every evaluation caption × seed, one
image per model at the same seed: base, population DPO (LoRA), PPD with u's embedding, and PPD with the
embedding of another held-out user whose favourite differs ("shuffled"). The judge reads each image's free
attribute (the background, or the colour) and the caption's four named attributes. Paired tests: per user
(n = held-out users; each user's share of favourite values and mean utility) and per image (n = users × captions
× seeds; utility).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
from tqdm.auto import tqdm


def _judge(samples, captions, free):
    from t2i_align.gallery import to_uint8
    from t2i_align.toy.ppd import judge_user_images

    return judge_user_images(to_uint8(samples.images), captions, free)


def _sample(pipe, captions, seeds, tokens=None):
    from t2i_align.sampling import generate
    from t2i_align.toy.evaluate import TOY_GUIDANCE, TOY_STEPS

    return generate(pipe, captions, seeds, num_inference_steps=TOY_STEPS, guidance_scale=TOY_GUIDANCE,
                    batch_size=128, user_tokens=tokens)


def _per_user(user, values: List[Optional[str]], named: List[float]) -> Dict:
    util = [user.utility(v) for v in values]
    return {"favourite_share": float(np.mean([v == user.favourite for v in values])),
            "utility": float(np.mean(util)), "named": float(np.mean(named)), "per_image_utility": util,
            "per_image_named": named}


def _tests(a: List[float], b: List[float]) -> Dict:
    from t2i_align.stats import paired_diff, win_rate

    w, d = win_rate(a, b), paired_diff(a, b)
    return {"mean_a": float(np.mean(a)), "mean_b": float(np.mean(b)), "wins": w["wins"], "losses": w["losses"],
            "ties": w["ties"], "sign_p": w["p_value"], "mean_diff": d["mean_diff"], "diff_ci": [d["low"], d["high"]],
            "t_p": d["p_value"], "n": d["n"]}


def _shuffled(users) -> Dict[int, int]:
    """Each held-out user -> the next held-out user (cyclically) whose favourite differs from theirs."""
    out = {}
    for i, u in enumerate(users):
        for step in range(1, len(users)):
            v = users[(i + step) % len(users)]
            if v.favourite != u.favourite:
                out[u.user_id] = v.user_id
                break
    return out


def _setting(args):
    """(free attribute, held-out users, user table, evaluation captions, eval captions × seeds, their seeds)."""
    from t2i_align.sampling import prompt_major
    from t2i_align.toy.users import ToyUser
    from t2i_align.users import UserTable
    from toy_ppd import _captions

    root = Path(args.root)
    meta = _users_meta(args)
    free = meta.get("attribute", "background")  # data written before the colour option: background
    users = [ToyUser(int(i), tuple(r), free) for i, r in meta["heldout_users"].items()]
    table = UserTable.load(root / args.heldout_set / "user_table.safetensors")
    _, _, eval_caps = _captions(args.seed, free)
    captions, seeds = prompt_major(eval_caps, args.eval_seeds, args.eval_base_seed + args.seed)
    return free, users, table, eval_caps, captions, seeds


def _users_meta(args) -> Dict:
    path = Path(args.root) / args.heldout_set / "users.json"
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; write it first with `toy_ppd.py data` (or `heldout "
                         f"--heldout-set {args.heldout_set}`) under --root {args.root}")
    return json.loads(path.read_text())


def _ppd_pipeline(args):
    """The PPD run `args.ppd_run` as a toy pipeline, its user branch at `args.user_scale`."""
    from t2i_align.conditioning.users import set_user_scale
    from t2i_align.sampling import load_pipeline

    pipe = load_pipeline("toy", lora=Path(args.root) / args.ppd_run / "final")
    set_user_scale(pipe.unet, args.user_scale)
    return pipe


def _picture(args) -> Path:
    suffix = "" if args.ppd_run == "ppd" else f"-{args.ppd_run}"
    suffix += "" if args.user_scale == 1.0 else f"-scale{args.user_scale:g}"
    return Path(args.root) / f"interpolation{suffix}-seed{args.eval_base_seed}.png"


def stage_eval(args) -> Dict:
    from t2i_align.sampling import load_pipeline

    root = Path(args.root)
    free, users, table, eval_caps, captions, seeds = _setting(args)
    n = len(captions)
    judged = {}
    for name, lora in (("base", None), ("dpo", root / "dpo" / "final")):
        if lora is None or lora.exists():
            judged[name] = _judge(_sample(load_pipeline("toy", lora=lora), captions, seeds), captions, free)
    ppd = _ppd_pipeline(args)
    swap = _shuffled(users)
    results: Dict[str, Dict] = {name: {} for name in ("base", "dpo", "ppd", "ppd_shuffled") if name in judged
                                or name.startswith("ppd")}
    for user in tqdm(users, desc=f"judge held-out users ({args.ppd_run})"):
        for name in judged:
            results[name][user.user_id] = _per_user(user, *judged[name])
        for name, source in (("ppd", user.user_id), ("ppd_shuffled", swap[user.user_id])):
            tokens = table.tokens([source] * n)
            results[name][user.user_id] = _per_user(user, *_judge(_sample(ppd, captions, seeds, tokens), captions,
                                                                  free))
    report = _report(results, users)
    report["interpolation"] = _interpolation(ppd, table, users, captions, seeds, free, _picture(args),
                                             pairs=args.interp_pairs)
    report["settings"] = {"heldout_users": len(users), "eval_captions": len(eval_caps),
                          "seeds_per_caption": args.eval_seeds, "images_per_user_per_model": n,
                          "eval_base_seed": args.eval_base_seed, "attribute": free, "user_scale": args.user_scale}
    return report


def stage_interp(args) -> Dict:
    """Only the interpolation (and its picture) of the PPD run `args.ppd_run`, at the evaluation seeds."""
    free, users, table, _, captions, seeds = _setting(args)
    return _interpolation(_ppd_pipeline(args), table, users, captions, seeds, free, _picture(args),
                          pairs=args.interp_pairs)


def stage_attributes(args) -> Dict:
    """Which named attribute does the user branch cost? For the first `args.attribute_users` held-out users, at
    the evaluation seeds: the judge's accuracy on each attribute the caption names and the favourite share, for
    the base, PPD with the user's embedding and PPD with the shuffled one (means over those users), the branch at
    user scale `args.user_scale`."""
    from t2i_align.gallery import to_uint8
    from t2i_align.sampling import load_pipeline
    from t2i_align.toy.judge import read_attributes
    from t2i_align.toy.users import named_attributes

    free, users, table, _, captions, seeds = _setting(args)
    users, swap = users[:args.attribute_users], _shuffled(users)
    wanted = [named_attributes(c, free) for c in captions]

    def reads_of(samples):
        return [read_attributes(im) for im in to_uint8(samples.images)]

    def judged(reads, favourite):
        out = {a: float(np.mean([r[a] == w[a] for r, w in zip(reads, wanted)])) for a in wanted[0]}
        return {**out, "favourite_share": float(np.mean([r[free] == favourite for r in reads]))}

    base = reads_of(_sample(load_pipeline("toy"), captions, seeds))
    ppd = _ppd_pipeline(args)
    rows: Dict[str, List[Dict]] = {"base": [], "ppd": [], "ppd_shuffled": []}
    pooled: Dict[str, List[Dict]] = {"base": base * len(users), "ppd": [], "ppd_shuffled": []}
    for user in tqdm(users, desc=f"attributes ({args.ppd_run})"):
        rows["base"].append(judged(base, user.favourite))
        for name, source in (("ppd", user.user_id), ("ppd_shuffled", swap[user.user_id])):
            reads = reads_of(_sample(ppd, captions, seeds, table.tokens([source] * len(captions))))
            rows[name].append(judged(reads, user.favourite))
            pooled[name] += reads
    out = {name: {k: float(np.mean([r[k] for r in per])) for k in per[0]} for name, per in rows.items()}
    return out | {"by_free_value": _by_free_value(pooled, wanted * len(users), free),
                  "users": [u.user_id for u in users], "eval_base_seed": args.eval_base_seed,
                  "user_scale": args.user_scale}


def stage_shots(args) -> Dict:
    """What each held-out user's 4 shots show: "preferred>dispreferred" values of the free attribute per shot (the
    shot pool is the base's samples, so a favourite the base rarely draws may never appear in them)."""
    from t2i_align.toy.ppd import Pool, _fingerprint
    from t2i_align.toy.users import favourite_read_right

    root = Path(args.root)
    meta = _users_meta(args)
    free, users, *_ = _setting(args)
    pool = Pool.load(root / "shot-pool")
    k = pool.images.shape[1]
    values = {_fingerprint(pool, p, a, b): (pool.free[p][a], pool.free[p][b])
              for p in range(len(pool.captions)) for a in range(k) for b in range(a + 1, k)}
    out, right = {}, []
    for user in users:
        shots = [values[f] for f in meta["shot_fingerprints"][str(user.user_id)]]
        shown = [(a, b) if user.label(a, b) == 1.0 else (b, a) for a, b in shots]
        right.append(favourite_read_right(user, shown))
        out[str(user.user_id)] = {"ranking": list(user.ranking), "shots": [f"{a}>{b}" for a, b in shown],
                                  "oracle_right": right[-1]}
    # A perfect reader of the shots serves its most probable favourite: how many users could it serve at best?
    out["shot_oracle_expected_right"] = {"users": len(users), "expected_right": float(sum(right))}
    return out


def _by_free_value(pooled: Dict[str, List[Dict]], wanted: List[Dict], free: str) -> Dict:
    """Per model and value of the free attribute: its share of the images and the named attributes' accuracy on
    them; plus `named_at_base_rates`, the named score the model would get if it drew its mix of free values with
    the base's accuracy at each (how much of a fall the base's own weakness at some values explains)."""
    def named(reads, idx):
        return float(np.mean([np.mean([reads[i][a] == wanted[i][a] for a in wanted[i]]) for i in idx]))

    def split(reads):
        values = sorted({r[free] for r in reads}, key=str)
        return {str(v): [i for i, r in enumerate(reads) if r[free] == v] for v in values}

    base_idx = split(pooled["base"])
    base_at = {v: named(pooled["base"], idx) for v, idx in base_idx.items()}
    out = {}
    for name, reads in pooled.items():
        per = {v: {"share": len(idx) / len(reads), "named": named(reads, idx),
                   "color": float(np.mean([reads[i]["color"] == wanted[i].get("color") for i in idx]))}
               for v, idx in split(reads).items()}
        at_base = sum(d["share"] * base_at.get(v, d["named"]) for v, d in per.items())
        out[name] = {"per_value": per, "named": named(reads, range(len(reads))), "named_at_base_rates": at_base}
    return out


def _report(results: Dict[str, Dict], users) -> Dict:
    ids = [u.user_id for u in users]
    out: Dict = {"per_model": {}, "tests": {}}
    for name, per in results.items():
        out["per_model"][name] = {k: float(np.mean([per[i][k] for i in ids]))
                                  for k in ("favourite_share", "utility", "named")}
        out["per_model"][name]["per_user_favourite_share"] = [per[i]["favourite_share"] for i in ids]
    for other in ("dpo", "ppd_shuffled", "base"):
        if other not in results:
            continue
        a, b = results["ppd"], results[other]
        out["tests"][f"ppd_vs_{other}"] = {
            "per_user_favourite_share": _tests([a[i]["favourite_share"] for i in ids],
                                               [b[i]["favourite_share"] for i in ids]),
            "per_user_utility": _tests([a[i]["utility"] for i in ids], [b[i]["utility"] for i in ids]),
            "per_image_utility": _tests([x for i in ids for x in a[i]["per_image_utility"]],
                                        [x for i in ids for x in b[i]["per_image_utility"]]),
            "per_image_named": _tests([x for i in ids for x in a[i]["per_image_named"]],
                                      [x for i in ids for x in b[i]["per_image_named"]]),
            # the base's and population DPO's images are the same for every user, so images repeat across users
            # on that side: average each (caption, seed) slot over users and test over slots instead
            "per_slot_named": _tests(*(np.mean([m[i]["per_image_named"] for i in ids], 0).tolist() for m in (a, b))),
        }
    out["by_favourite"] = _by_favourite(results, users)
    out["per_image"] = {name: {str(i): {k: per[i][k] for k in ("per_image_utility", "per_image_named")} for i in ids}
                        for name, per in results.items()}  # to re-test without re-sampling (`retest`)
    return out


def _by_favourite(results: Dict[str, Dict], users) -> Dict:
    """Per favourite value: how many users, each model's mean favourite share, PPD's users won-lost-tied."""
    out = {}
    for fav in sorted({u.favourite for u in users}):
        ids = [u.user_id for u in users if u.favourite == fav]
        share = {name: [per[i]["favourite_share"] for i in ids] for name, per in results.items()}
        out[fav] = {"users": len(ids), "favourite_share": {k: float(np.mean(v)) for k, v in share.items()}}
        for other in ("dpo", "ppd_shuffled"):
            if other in share:
                pairs = list(zip(share["ppd"], share[other]))
                out[fav][f"ppd_vs_{other}"] = "{}-{}-{}".format(sum(a > b for a, b in pairs),
                                                                sum(a < b for a, b in pairs),
                                                                sum(a == b for a, b in pairs))
    return out


def stage_retest(args) -> Dict:
    """The statistics of the `eval` report of the same options again, from its saved per-image reads (no
    re-sampling): for statistics added after a run."""
    from toy_ppd import _report_path

    _, users, *_ = _setting(args)
    path = _report_path(args, "eval")
    if not path.is_file():
        raise SystemExit(f"error: {path} not found; run `toy_ppd.py eval` with the same options first")
    saved = json.loads(path.read_text())["stage_eval"]
    if "per_image" not in saved:
        raise SystemExit(f"error: {path} predates saved per-image reads; run `toy_ppd.py eval` again to retest it")
    saved = saved["per_image"]
    results = {name: {u.user_id: _from_reads(per[str(u.user_id)]) for u in users} for name, per in saved.items()}
    report = _report(results, users)
    report.pop("per_image")
    return report


def _from_reads(reads: Dict) -> Dict:
    util, named = reads["per_image_utility"], reads["per_image_named"]
    return {"favourite_share": float(np.mean([u == 1.0 for u in util])), "utility": float(np.mean(util)),
            "named": float(np.mean(named)), "per_image_utility": util, "per_image_named": named}


def _interpolation(pipe, table, users, captions, seeds, free, picture: Optional[Path] = None,
                   columns: int = 12, pairs: int = 1) -> Dict:
    """Between user A and user B: the share of B's favourite and of A's favourite among the images sampled with
    α·e_B + (1−α)·e_A, α = 0, .25, .5, .75, 1. The first `pairs` held-out users each play A once, with B the next
    held-out user whose favourite differs (`_shuffled`; the first pair is the first two users with different
    favourites); `mean_rows` averages the pairs' curves. `picture`: a PNG of the first pair, one row per α (top:
    α = 0, user A), the first `columns` images, drawn 3x larger."""
    swap = _shuffled(users)
    out = [_interpolate_pair(pipe, table, a, next(u for u in users if u.user_id == swap[a.user_id]), captions,
                             seeds, free, picture if i == 0 else None, columns) for i, a in enumerate(users[:pairs])]
    mean = [{k: row[k] if k == "alpha" else float(np.mean([o["rows"][j][k] for o in out])) for k in row}
            for j, row in enumerate(out[0]["rows"])]
    return {"pairs": out, "mean_rows": mean, "picture": str(picture) if picture else None}


def _interpolate_pair(pipe, table, a, b, captions, seeds, free, picture: Optional[Path], columns: int) -> Dict:
    from PIL import Image

    from t2i_align.gallery import save_grid, to_uint8

    rows, cells = [], []
    for alpha in tqdm((0.0, 0.25, 0.5, 0.75, 1.0), desc=f"interpolation {a.user_id} -> {b.user_id}"):
        tokens = table.interpolate(a.user_id, b.user_id, alpha)[None].repeat(len(captions), 1, 1)
        samples = _sample(pipe, captions, seeds, tokens)
        values, _ = _judge(samples, captions, free)
        rows.append({"alpha": alpha, "share_B_favourite": float(np.mean([x == b.favourite for x in values])),
                     "share_A_favourite": float(np.mean([x == a.favourite for x in values]))})
        cells += [Image.fromarray(im).resize((im.shape[1] * 3, im.shape[0] * 3), Image.NEAREST)
                  for im in to_uint8(samples.images)[:columns]]
    if picture is not None:
        save_grid(cells, picture, ncols=columns)
    return {"user_A": a.user_id, "A_favourite": a.favourite, "user_B": b.user_id, "B_favourite": b.favourite,
            "rows": rows}
