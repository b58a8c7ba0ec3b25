"""LongAlign's toy evidence: judge models on the held-out LONG captions (background sentence past token 77).

    python benchmarks/longalign_toy.py judge --out runs/longalign-eval/base_clip77.json [--model DIR]
        [--lora PATH] [--text-encoding clip77|segments] [--captions long|short] [--seeds 8] [--reward]
        [--reward-checkpoint toy|toy-denscore]
    python benchmarks/longalign_toy.py compare TUNED.json BASE.json     # tuned − base, image by image
    python benchmarks/longalign_toy.py retrieval [--checkpoint toy-denscore]  # can the reward read each sentence?
    python benchmarks/longalign_toy.py export --run runs/x --step 1000   # a LoRA checkpoint -> runs/x/step-1000/

`judge` writes every image's per-attribute verdict (t2i_align/toy/long_eval.py) and prints the summary;
`--reward` also scores the images with decomposed-clip on the toy CLIP (or `--reward-checkpoint toy-denscore`,
the toy Denscore; ω = 0.3, direction fitted on toy:train-long, as the reward runs fit it). `compare` prints
per-attribute paired differences with t-test and sign-test p-values. `retrieval`: for each held-out scene, the
model's cosine (toy CLIP, or `--checkpoint toy-denscore`) between a rendered image and each background sentence
(and each whole long / short caption) of the scene's 3 background variants; accuracy = how often the true
background scores highest (chance 1/3), the segment-level retrieval LongAlign's reward needs; the image side
(`t2i_align.toy.denscore.image_retrieval`), the choice the reward's gradient makes: per attribute, how often the
scene's render outscores the renders with that attribute changed, on its long caption; and how alike the model
finds a scene and its left/right or top/bottom mirror (`position_cosines`).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def cmd_judge(args) -> dict:
    from t2i_align.sampling import load_pipeline
    from t2i_align.toy.long_eval import judge_records, summarize_record

    pipe = load_pipeline(args.model, lora=args.lora, text_encoding=args.text_encoding)
    reward = None
    if args.reward:
        from reward_models import get_reward

        reward = get_reward("decomposed-clip", checkpoint=args.reward_checkpoint, omega=0.3,
                            fit_prompts="toy:train-long")
    from tqdm.auto import tqdm

    from t2i_align.toy.evaluate import prompt_set

    total = len(prompt_set(args.prompts)) * args.seeds
    with tqdm(total=total, desc=f"judge ({args.captions} captions)", unit="img", file=sys.stderr) as bar:
        record = judge_records(pipe, args.prompts, args.captions, args.seeds, args.seed, reward=reward,
                               progress=bar.update)
    from t2i_align.sampling import pipeline_components

    record.update(model=args.model, lora=args.lora, text_encoding=pipeline_components(pipe).text_encoding.kind,
                  reward_checkpoint=args.reward_checkpoint if args.reward else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from t2i_align.files import write_text_atomic  # a result file whole or not at all
    write_text_atomic(Path(args.out), json.dumps(record))
    return {"out": args.out, "model": args.model, "lora": args.lora, "text_encoding": record["text_encoding"],
            "captions": args.captions, **summarize_record(record)}


def cmd_compare(args) -> dict:
    from t2i_align.toy.long_eval import compare_records

    tuned, base = (json.loads(Path(p).read_text()) for p in (args.tuned, args.base))
    return {"tuned": args.tuned, "base": args.base, **compare_records(tuned, base)}


def cmd_retrieval(args) -> dict:
    import random

    import torch

    from reward_models import get_reward
    from t2i_align.toy.evaluate import prompt_set
    from t2i_align.toy.scenes import BACKGROUNDS, long_caption, render, short_caption
    from t2i_align.conditioning.segments import caption_segments

    from tqdm.auto import tqdm

    from t2i_align.toy.denscore import image_retrieval

    reward = get_reward("decomposed-clip", checkpoint=args.checkpoint, omega=1.0)
    clip = reward.encoder
    scenes = prompt_set(args.prompts)
    rng = random.Random(0)
    hits = {"background_sentence": 0, "long_caption": 0, "short_caption": 0}
    for i, scene in enumerate(scenes):
        image = torch.from_numpy(render(scene, rng)).permute(2, 0, 1).float()[None] / 255.0
        x = clip.encode_images(image)[0]
        variants = [type(scene)(**{**scene.as_dict(), "background": bg}) for bg in BACKGROUNDS]
        texts = {"background_sentence": [caption_segments(long_caption(v, random.Random(i)))[-1] for v in variants],
                 "long_caption": [long_caption(v, random.Random(i)) for v in variants],
                 "short_caption": [short_caption(v) for v in variants]}
        truth = list(BACKGROUNDS).index(scene.background)
        for kind, options in texts.items():
            t, _ = clip.encode_texts(options)
            hits[kind] += int(int((t @ x).argmax()) == truth)
    return {"prompts": args.prompts, "checkpoint": args.checkpoint, "n": len(scenes), "chance": 1 / 3,
            "accuracy": {k: v / len(scenes) for k, v in hits.items()},
            "image_side_long_caption": image_retrieval(reward, scenes, progress=tqdm(
                total=len(scenes), desc="image-side retrieval", unit="scene", file=sys.stderr).update),
            "position_cosines": _position_cosines(clip, scenes)}


def _position_sentence(scene) -> str:
    """The long caption's size-and-position sentence (its third)."""
    from t2i_align.conditioning.segments import caption_segments
    from t2i_align.toy.scenes import long_caption

    return caption_segments(long_caption(scene))[2]


def _position_cosines(clip, scenes) -> dict:
    """Mean cosine between the embeddings of a scene moved to the other side (left <-> right) or the other half
    (top <-> bottom): its position sentence and its render. Near 1: the model cannot tell them apart."""
    import torch

    from t2i_align.toy.denscore import renders

    flips = {"left_right": {"left": "right", "right": "left"}, "top_bottom": {"top": "bottom", "bottom": "top"}}
    out = {}
    for key, swap in flips.items():
        moved = [type(s)(**{**s.as_dict(), "position": " ".join(swap.get(w, w) for w in s.position.split())})
                 for s in scenes]
        t0, _ = clip.encode_texts([_position_sentence(s) for s in scenes])
        t1, _ = clip.encode_texts([_position_sentence(s) for s in moved])
        with torch.no_grad():
            x0, x1 = clip.encode_images(renders(scenes, None)), clip.encode_images(renders(moved, None))
        out[key] = {"sentence": float((t0 * t1).sum(-1).mean()), "image": float((x0 * x1).sum(-1).mean())}
    return out


def cmd_export(args) -> dict:
    """A LoRA run's checkpoint as a `final/`-style folder (LoRA file + text-encoding record), to judge it."""
    from safetensors.torch import load_file

    from t2i_align.checkpoints import export_final
    from t2i_align.config import load_config
    from t2i_align.adapters import add_lora
    from t2i_align.models import build_pipeline, load_components

    run = Path(args.run)
    cfg = load_config(run / "config.yaml", [])
    comps = load_components(cfg.model)
    add_lora(comps.unet, cfg.lora)
    state = load_file(str(run / "checkpoints" / f"step-{args.step}" / "model.safetensors"))
    missing = [n for n, p in comps.unet.named_parameters() if p.requires_grad and n not in state]
    if missing:
        raise SystemExit(f"checkpoint lacks {len(missing)} LoRA weights, e.g. {missing[0]}")
    comps.unet.load_state_dict(state, strict=False)
    folder = export_final(build_pipeline(comps, unet=comps.unet), comps.unet, True, run / f"step-{args.step}")
    return {"lora": str(folder), "step": args.step}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    j = sub.add_parser("judge")
    j.add_argument("--out", required=True)
    j.add_argument("--model", default="toy")
    j.add_argument("--lora", default=None)
    j.add_argument("--text-encoding", choices=("clip77", "segments"), default=None)
    j.add_argument("--prompts", default="heldout", choices=("heldout", "train"))
    j.add_argument("--captions", default="long", choices=("long", "short"))
    j.add_argument("--seeds", type=int, default=8)
    j.add_argument("--seed", type=int, default=0)
    j.add_argument("--reward", action="store_true", help="also score with decomposed-clip (omega 0.3)")
    j.add_argument("--reward-checkpoint", default="toy", choices=("toy", "toy-denscore"))
    c = sub.add_parser("compare")
    c.add_argument("tuned")
    c.add_argument("base")
    r = sub.add_parser("retrieval")
    r.add_argument("--prompts", default="heldout", choices=("heldout", "train"))
    r.add_argument("--checkpoint", default="toy", choices=("toy", "toy-denscore"))
    e = sub.add_parser("export")
    e.add_argument("--run", required=True)
    e.add_argument("--step", type=int, required=True)
    args = p.parse_args()
    commands = {"judge": cmd_judge, "compare": cmd_compare, "retrieval": cmd_retrieval, "export": cmd_export}
    print(json.dumps(commands[args.command](args), indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
