"""sample/generate.py, sample/compare.py and sample/gallery.py on the toy model (few steps, few prompts)."""
import importlib.util
import os
import json
import sys
from pathlib import Path

import pytest

from helpers import one_torch_thread  # noqa: F401

SAMPLE = Path(__file__).resolve().parents[1] / "sample"
FAST = ["--steps", "2", "--seeds-per-prompt", "2"]


def _script(name):
    sys.path.insert(0, str(SAMPLE))
    spec = importlib.util.spec_from_file_location(f"sample_{name}", SAMPLE / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def prompts(tmp_path):
    path = tmp_path / "prompts.txt"
    path.write_text("a large red circle at the top left on a white background\n\n"
                    "a small blue triangle at the bottom right on a black background\n"
                    "a large yellow square at the top right on a gray background\n")
    return path


def test_generate_writes_images_and_metadata_that_t2i_score_reads(prompts, tmp_path, capsys):
    out = tmp_path / "samples"
    # --variant: the toy folder holds no fp16 files, so its plain weights load (as a tuned export beside a base)
    with pytest.warns(UserWarning, match="holds no fp16 weights \\(--variant fp16\\): its plain weights load"):
        result = _script("generate").main(["--prompts", str(prompts), "--out", str(out), "--variant", "fp16", *FAST])
    assert result["images"] == 6 and result["prompts"] == 3
    meta = [json.loads(s) for s in (out / "metadata.jsonl").read_text().splitlines()]
    assert meta[0]["variant"] is None and meta[0]["text_encoding"] == "clip77"  # as loaded and sampled
    assert [m["seed"] for m in meta[:2]] == [0, 10_000]  # image k of prompt i: seed + 10000k + i
    assert all((out / m["file"]).is_file() for m in meta)
    from reward_models.cli import main as score

    assert score(["--reward", "toy-judge", "--images", str(out), "--out", str(tmp_path / "s.jsonl")]) == 0
    rows = [json.loads(s) for s in (tmp_path / "s.jsonl").read_text().splitlines()]
    listed = [line for line in prompts.read_text().splitlines() if line]
    assert [r["prompt"] for r in rows] == [p for p in listed for _ in range(2)]  # two seeds per prompt, in order
    assert [r["file"] for r in rows] == [m["file"] for m in meta]
    # the judge's score is the fraction of 5 attributes right: 0, 0.2, ..., 1
    assert all(0.0 <= r["toy-judge"] <= 1.0 and 5 * r["toy-judge"] == pytest.approx(round(5 * r["toy-judge"]))
               for r in rows), rows


def test_generate_keeps_an_existing_folder_and_rejects_bad_input(prompts, tmp_path, capsys):
    run = _script("common").run_cli
    gen = _script("generate")
    out = tmp_path / "kept"
    out.mkdir()
    (out / "mine.png").write_bytes(b"user data")
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out), *FAST])) == 2
    assert "--overwrite" in capsys.readouterr().err and (out / "mine.png").read_bytes() == b"user data"
    # --overwrite deleted any folder whole; one generate.py did not write (no metadata.jsonl) is kept
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out), "--overwrite", *FAST])) == 2
    assert "holds files but no t2i_align_generated.json" in capsys.readouterr().err
    assert (out / "mine.png").read_bytes() == b"user data"
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    assert run(lambda: gen.main(["--prompts", str(empty), "--out", str(tmp_path / "x")])) == 2
    assert "holds no prompts" in capsys.readouterr().err
    bad_lora = tmp_path / "pytorch_lora_weights.safetensors"
    from safetensors.torch import save_file
    import torch

    save_file({"unet.nope.lora_A.weight": torch.zeros(2, 2)}, str(bad_lora))
    assert run(lambda: gen.main(["--prompts", str(prompts), "--lora", str(bad_lora), "--out",
                                 str(tmp_path / "y"), *FAST])) == 2
    assert "do not match" in capsys.readouterr().err and not (tmp_path / "y.partial").exists()
    # inf made every image black (blamed on the VAE), nan switched guidance off: both exited 0
    for args in (["--guidance", "-1"], ["--guidance", "inf"], ["--guidance", "nan"],
                 ["--guidance", "1", "--negative-prompt", "blurry"]):
        assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(tmp_path / "z"), *args])) == 2
        assert "give a scale >= 0, and > 1 with --negative-prompt" in capsys.readouterr().err
    for flag in ("--height", "--width"):
        assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(tmp_path / "z"), flag, "30"])) == 2
        assert f"error: {flag} 30: give a positive multiple of 8 (the VAE's scale), e.g. 24" in capsys.readouterr().err
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(tmp_path / "z"), "--batch-size", "0"])) == 2
    assert "error: --batch-size 0: give a number >= 1" in capsys.readouterr().err  # the flag named, not three


def test_compare_a_model_with_itself_gives_an_even_win_rate(prompts, tmp_path):
    result = _script("compare").main(["--prompts", str(prompts), "--reward", "toy-judge,toy-clip", *FAST,
                                      "--out", str(tmp_path / "cmp.json")])
    block = result["sets"][str(prompts)]["rewards"]
    for name in ("toy-judge", "toy-clip"):
        wr = block[name]["win_rate"]
        # 6 ties: rate 0.5, Wilson at n = 6: 0.5 ± z·sqrt(1/24 + z²/144) / (1 + z²/6) = 0.5 ± 0.31238
        assert wr["win_rate"] == 0.5 and wr["ties"] == 6
        assert (wr["low"], wr["high"]) == (pytest.approx(0.18762, abs=1e-4), pytest.approx(0.81238, abs=1e-4))
        assert block[name]["base"]["mean"] == block[name]["tuned"]["mean"]
        # over the 3 prompts (2 seeds each): every mean difference 0, so t = 0, p = 1 and no prompt won or lost
        per_prompt = block[name]["per_prompt"]
        assert per_prompt["groups"] == 3 and per_prompt["p_value"] == 1.0
        assert per_prompt["sign"] == {"wins": 0, "losses": 0, "p_value": 1.0}
    assert json.loads((tmp_path / "cmp.json").read_text())["sets"][str(prompts)]["images_per_model"] == 6
    # two rewards, read together: both tests Holm-adjusted over them (each p is 1 here, and stays 1)
    assert result["sets"][str(prompts)]["holm"] == {"t_test": {"toy-judge": 1.0, "toy-clip": 1.0},
                                                    "sign_test": {"toy-judge": 1.0, "toy-clip": 1.0},
                                                    "unit": "prompt"}


def test_compare_orients_tuned_over_base_and_groups_images_by_prompt(prompts, monkeypatch):
    """Known scores (the tuned side is sampled first, 6 images, then the base): tuned - base per image is
    [1, 1, 1, 1, -1, -1] over prompts [0, 0, 1, 1, 2, 2]; only comparisons of a model with itself ran before, which
    passed with tuned and base swapped or the images grouped by i % prompts."""
    import t2i_align.evaluation as evaluation

    given = iter([1.0, 1.0, 1.0, 1.0, -1.0, -1.0] + [0.0] * 6)
    monkeypatch.setattr(evaluation, "score_samples",
                        lambda samples, rewards: {"toy-judge": [next(given) for _ in samples.images]})
    block = _script("compare").main(["--prompts", str(prompts), "--reward", "toy-judge", *FAST])
    result = block["sets"][str(prompts)]["rewards"]["toy-judge"]
    assert result["win_rate"]["win_rate"] == pytest.approx(4 / 6) and result["win_rate"]["ties"] == 0
    assert result["tuned"]["mean"] == pytest.approx(1 / 3) and result["base"]["mean"] == 0.0
    assert result["paired_diff"]["mean_diff"] == pytest.approx(1 / 3)
    per_prompt = result["per_prompt"]  # prompt differences [1, 1, -1]: two prompts won, one lost
    assert per_prompt["groups"] == 3 and per_prompt["sign"]["wins"] == 2 and per_prompt["sign"]["losses"] == 1


def test_compare_counts_a_repeated_prompt_once_and_a_repeated_set_once(tmp_path, monkeypatch, capsys):
    """Prompts [A, B, A] at 2 seeds: differences [1, 1, -1, -1, 1, 1] are prompts A (4 images, mean 1) and B
    (mean -1), two units, not three (grouped by line, a file repeating a prompt had extra independent prompts);
    a set given twice was sampled twice."""
    import t2i_align.evaluation as evaluation

    a = "a large red circle at the top left on a white background"
    b = "a small blue square at the top right on a black background"
    repeated = tmp_path / "repeated.txt"
    repeated.write_text(f"{a}\n{b}\n{a}\n")
    given = iter([1.0, 1.0, -1.0, -1.0, 1.0, 1.0] + [0.0] * 6)
    calls = []
    monkeypatch.setattr(evaluation, "score_samples",
                        lambda samples, _: calls.append(1) or {"toy-judge": [next(given) for _ in samples.images]})
    block = _script("compare").main(["--prompts", str(repeated), "--prompts", str(repeated), "--reward", "toy-judge",
                                     *FAST])
    per_prompt = block["sets"][str(repeated)]["rewards"]["toy-judge"]["per_prompt"]
    assert per_prompt["groups"] == 2 and (per_prompt["sign"]["wins"], per_prompt["sign"]["losses"]) == (1, 1)
    assert list(block["sets"]) == [str(repeated)] and len(calls) == 2  # one set: tuned, then base
    err = capsys.readouterr().err
    assert "repeats a set" in err and "holds 1 repeated prompt(s)" in err


def test_compare_refuses_an_out_that_is_its_prompts_file(prompts, capsys):
    """With --overwrite, --out prompts.txt replaced the prompts file with the JSON (generate.py checked this)."""
    before = prompts.read_text()
    code = _script("common").run_cli(lambda: _script("compare").main(
        ["--prompts", str(prompts), "--reward", "toy-judge", "--out", str(prompts), "--overwrite", *FAST]))
    assert code == 2 and f"--out {prompts} is or holds --prompts {prompts}" in capsys.readouterr().err
    assert prompts.read_text() == before


def test_a_model_folder_that_cannot_sample_gets_its_error_alone(prompts, tmp_path, capsys):
    """A UNet-only folder as --model was first 'compared with itself' (a note), then refused."""
    (tmp_path / "unet-only" / "unet").mkdir(parents=True)
    code = _script("common").run_cli(lambda: _script("compare").main(
        ["--model", str(tmp_path / "unet-only"), "--prompts", str(prompts), "--reward", "toy-judge", *FAST]))
    err = capsys.readouterr().err
    assert code == 2 and "has no model_index.json" in err and "compared with itself" not in err, err


def test_compare_refuses_an_out_inside_its_lora_folder(prompts, tmp_path, capsys):
    """Only --out equal to an input was refused: `--lora run/final --out run/final/<weights> --overwrite` replaced
    the LoRA's weights with the JSON."""
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "pytorch_lora_weights.safetensors").write_bytes(b"weights")
    out = final / "pytorch_lora_weights.safetensors"
    code = _script("common").run_cli(lambda: _script("compare").main(
        ["--lora", str(final), "--prompts", str(prompts), "--out", str(out), "--overwrite", *FAST]))
    assert code == 2 and f"--out {out} lies inside --lora {final}" in capsys.readouterr().err
    assert out.read_bytes() == b"weights"


def test_compare_reads_its_prompts_before_loading_rewards(tmp_path, monkeypatch, capsys):
    """A typo'd --prompts was reported only after every reward (PickScore, HPSv2...) had loaded."""
    compare = _script("compare")

    def no_load(*args):
        pytest.fail("rewards loaded before the prompts were read")
    monkeypatch.setattr(compare, "load_reward_set", no_load)
    code = _script("common").run_cli(lambda: compare.main(["--prompts", str(tmp_path / "typo.txt")]))
    assert code == 2 and "typo.txt" in capsys.readouterr().err


def test_compare_keeps_the_sets_done_when_a_later_one_fails(prompts, tmp_path, monkeypatch, capsys):
    """--out is written after each prompt set: a failure in the second set (here: out of memory while sampling)
    keeps the first set's block, and `unfinished` names the second (everything was lost before session 22)."""
    import t2i_align.evaluation as evaluation

    real, calls = evaluation.sample_model, []

    def sample_model(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second set's tuned side
            raise RuntimeError("CUDA out of memory")
        return real(*args, **kwargs)

    monkeypatch.setattr(evaluation, "sample_model", sample_model)
    other = tmp_path / "other.txt"
    other.write_text(Path(prompts).read_text())
    out = tmp_path / "cmp.json"
    with pytest.raises(RuntimeError, match="out of memory"):
        _script("compare").main(["--prompts", str(prompts), "--prompts", str(other), "--reward", "toy-judge",
                                 *FAST, "--out", str(out)])
    saved = json.loads(out.read_text())
    assert list(saved["sets"]) == [str(prompts)] and saved["unfinished"] == [str(other)]
    assert saved["sets"][str(prompts)]["images_per_model"] == 6
    assert f"note: {out} holds the 1 set(s) compared so far" in capsys.readouterr().err
    calls.clear()  # without --out the finished set is printed before the failure ends the run
    with pytest.raises(RuntimeError, match="out of memory"):
        _script("compare").main(["--prompts", str(prompts), "--prompts", str(other), "--reward", "toy-judge", *FAST])
    printed = capsys.readouterr()
    assert list(json.loads(printed.out)["sets"]) == [str(prompts)] and "printed above" in printed.err


@pytest.mark.parametrize("script", ["compare", "gallery"])
def test_the_base_model_defaults_to_the_tuned_models_folder(script, tmp_path, monkeypatch):
    """--model /data/sd15 --lora X without --base-model compares with /data/sd15 itself, not the toy model (it
    silently did: --base-model defaulted to toy)."""
    import t2i_align.evaluation as evaluation

    module, seen = _script(script), []

    def sample_model(model, lora, *args, **kwargs):
        seen.append(model)
        if len(seen) == 2:  # both sides (compare samples the tuned one first)
            raise SystemExit(0)

    monkeypatch.setattr(evaluation, "sample_model", sample_model)
    monkeypatch.setattr(module, "load_reward_set", lambda *a, **k: {}, raising=False)
    from t2i_align.config.sections import TextEncodingConfig

    # the folders do not exist
    monkeypatch.setattr(module, "check_models", lambda sides, vae=None: dict.fromkeys(sides, TextEncodingConfig()))
    monkeypatch.setattr(module, "has_user_branch", lambda model, lora: False, raising=False)
    with pytest.raises(SystemExit):
        module.main(["--model", str(tmp_path / "sd15"), "--lora", str(tmp_path / "lora"), "--out", str(tmp_path / "o"),
                     "--prompts", "toy:heldout"])
    assert seen == [str(tmp_path / "sd15")] * 2


def test_gallery_writes_html_and_a_wandb_offline_run(prompts, tmp_path):
    result = _script("gallery").main(["--prompts", str(prompts), "--out", str(tmp_path / "g"), "--wandb",
                                      "offline", *FAST])
    html = Path(result["gallery"]).read_text()
    assert "base · seed 1" in html and "toy-judge" in html
    assert "<h1>base: toy vs tuned: toy</h1>" in html  # the models shown, not "gallery at step 0"
    media = list(Path(result["wandb_run_dir"]).glob("files/media/images/gallery/*.png"))
    assert media


def test_guidance_defaults_to_the_models_own(tmp_path):
    """--guidance defaulted to the toy model's 3.0 for every model: SD1.5 and SDXL sampled washed out."""
    from t2i_align.toy.assets import pipeline_dir

    guidance = _script("common").default_guidance
    for name, cls in (("sd15", "StableDiffusionPipeline"), ("sdxl", "StableDiffusionXLPipeline")):
        (tmp_path / name).mkdir()
        (tmp_path / name / "model_index.json").write_text(json.dumps({"_class_name": cls}))
    assert (guidance(str(tmp_path / "sd15")), guidance(str(tmp_path / "sdxl"))) == (7.5, 5.0)
    assert guidance("toy") == guidance(str(pipeline_dir())) == 3.0
    assert (guidance("stabilityai/stable-diffusion-xl-base-1.0"), guidance("org/sd15")) == (5.0, 7.5)


def test_models_made_from_the_toy_are_sampled_at_its_guidance(tmp_path):
    """A merged toy (LongAlign's stage-1 merged/, which stage 2's LoRA records as its model) and a full export of
    it were sampled at SD1.5's 7.5: they looked broken beside the toy's 3.0 galleries. Merges and full exports now
    record what they were made from, followed back to the toy; a real-format model's merge keeps 7.5."""
    from helpers import export_random_lora, save_tiny_pipeline
    from t2i_align.checkpoints import export_final
    from t2i_align.merge import merge_lora
    from t2i_align.models import build_pipeline, load_components
    from t2i_align.config import ModelConfig

    guidance = _script("common").default_guidance
    merged = merge_lora("toy", export_random_lora("toy", tmp_path / "stage1"), tmp_path / "merged")
    comps = load_components(ModelConfig(pretrained=str(merged)))
    full = export_final(build_pipeline(comps), comps.unet, False, tmp_path / "full-run", base_model=str(merged))
    assert guidance(str(merged)) == guidance(str(full)) == 3.0
    sd15 = save_tiny_pipeline("sd15", tmp_path / "sd15")
    assert guidance(str(merge_lora(sd15, export_random_lora(sd15, tmp_path / "sd"), tmp_path / "sd-merged"))) == 7.5


def test_gallery_of_real_prompts_needs_no_reward_flag(tmp_path, capsys):
    """The default --reward toy-judge refused every prompt that is not a toy caption: an SD user's gallery needed
    --reward ''. Now it is shown without a reward, with a note; toy captions keep toy-judge (test above)."""
    path = tmp_path / "p.txt"
    path.write_text("a photo of a cat on a sofa\n")
    result = _script("gallery").main(["--prompts", str(path), "--out", str(tmp_path / "g"), *FAST])
    assert "no reward under the images (toy-judge reads only toy captions)" in capsys.readouterr().err
    assert "toy-judge" not in Path(result["gallery"]).read_text()


def test_gallery_whose_model_fails_to_load_leaves_no_empty_out_folder(prompts, tmp_path):
    import torch
    from safetensors.torch import save_file

    from t2i_align.models import ModelLoadError

    bad_lora = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.nope.lora_A.weight": torch.zeros(2, 2)}, str(bad_lora))
    for wandb in ("off", "offline"):  # offline: OUT/wandb/ held the failed run, so OUT stayed
        with pytest.raises(ModelLoadError, match="do not match"):
            _script("gallery").main(["--prompts", str(prompts), "--lora", str(bad_lora), "--out",
                                     str(tmp_path / "g"), "--wandb", wandb, *FAST])
        assert not (tmp_path / "g").exists()


def test_gallery_samples_each_side_in_its_text_encoding(tmp_path, monkeypatch):
    """--text-encoding / --base-text-encoding were accepted and ignored."""
    import t2i_align.evaluation as evaluation

    seen = {}

    def sample_model(model, lora, prompts, settings, device, encoding=None, user=None):
        seen[len(seen)] = encoding
        if len(seen) == 2:
            raise SystemExit(0)

    monkeypatch.setattr(evaluation, "sample_model", sample_model)
    with pytest.raises(SystemExit):
        _script("gallery").main(["--out", str(tmp_path / "g"), "--text-encoding", "segments",
                                 "--base-text-encoding", "clip77", "--reward", ""])
    assert seen == {0: "segments", 1: "clip77"}  # tuned, then base (the tuned side's flags fail first)


def _unsampled(*args, **kwargs):
    raise AssertionError("sampled before checking")


def test_generate_refuses_the_current_folder_or_one_above_it_as_out(prompts, tmp_path, monkeypatch, capsys):
    """`--out .` passed the check, then replace_dir failed to rename '.' after all the sampling, the images left in
    a hidden temp folder."""
    import t2i_align.evaluation as evaluation

    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    run, gen = _script("common").run_cli, _script("generate")
    for out, example in ((".", "samples"), (str(work), str(work / "samples")), ("..", "../samples"),
                         (str(tmp_path), str(tmp_path / "samples"))):
        assert run(lambda: gen.main(["--prompts", str(prompts), "--out", out, "--overwrite"])) == 2
        assert capsys.readouterr().err == (f"error: --out {out} is the current folder, one above it or a '..' path, "
                                           f"which generate.py cannot replace whole: give a new folder, e.g. --out "
                                           f"{example}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prompts.txt", "work"] and not any(work.iterdir())


def _sampler(images, calls, stop=None):
    """A stand-in for sample_model in generate._sample_into: image i of `images` at prompt "p{i}", seed i, one
    per batch, stopped by Ctrl-C at image `stop`."""
    from t2i_align.sampling import Samples

    def sample(first, write):
        calls.append(first)
        for i in range(first, len(images)):
            if i == stop:
                raise KeyboardInterrupt
            write(Samples(latents=None, images=images[i:i + 1], prompts=[f"p{i}"], seeds=[i]))
    return sample


def test_generate_resumes_where_an_interrupted_run_stopped(tmp_path, capsys):
    import numpy as np
    import torch
    from PIL import Image

    from t2i_align.errors import UserError

    gen, images, calls = _script("generate"), torch.rand(5, 3, 8, 8), []
    out, part, run = tmp_path / "out", tmp_path / "out.partial", {"steps": 2, "batch_size": 1, "images": 5}
    with pytest.raises(KeyboardInterrupt):
        gen._sample_into(out, _sampler(images, calls, stop=3), {"steps": 2}, run)
    assert f"note: 3 of 5 images are kept in {part}: the same command with --resume" in capsys.readouterr().err
    assert sorted(p.name for p in part.iterdir()) == ["00000.png", "00001.png", "00002.png", "metadata.jsonl",
                                                      gen.MADE_BY] and not out.exists()
    with open(part / "metadata.jsonl", "a") as listing:  # a kill while writing image 3: its PNG, half its line
        listing.write('{"file": "00003.png", "pro')
    (part / "00003.png").write_bytes(b"half")
    with pytest.raises(UserError, match="holds 3 images of an unfinished generate.py run: add --resume to finish"):
        gen._sample_into(out, _sampler(images, calls), {"steps": 2}, run)
    with pytest.raises(UserError, match=r"started with other settings \(steps differ\)"):
        gen._sample_into(out, _sampler(images, calls), {"steps": 3}, {**run, "steps": 3}, resume=True)
    # a smaller batch (after running out of memory) makes the same images
    assert gen._sample_into(out, _sampler(images, calls), {"steps": 2}, {**run, "batch_size": 4}, resume=True) == 5
    assert calls == [0, 3] and not part.exists()
    listed = [json.loads(s) for s in (out / "metadata.jsonl").read_text().splitlines()]
    assert listed == [{"file": f"{i:05d}.png", "prompt": f"p{i}", "seed": i, "steps": 2} for i in range(5)]
    expected = (images * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert all(np.array_equal(np.asarray(Image.open(out / m["file"])), expected[i]) for i, m in enumerate(listed))
    assert json.loads((out / gen.MADE_BY).read_text())["images"] == 5


def test_a_second_generate_on_an_out_in_use_is_refused(tmp_path):
    """Two runs on one --out: the second deleted the first's image-less OUT.partial, the first went on writing into
    the second's, and a folder of 60 images with 52 metadata lines was published as finished."""
    import os

    import torch

    from t2i_align.errors import UserError
    from t2i_align.files import take_lock

    gen, images, calls = _script("generate"), torch.rand(2, 3, 8, 8), []
    out, run = tmp_path / "out", {"steps": 2, "batch_size": 1, "images": 2}
    held = take_lock(tmp_path / ".out.lock", "the first run's", "")
    try:
        with pytest.raises(UserError, match=r"--out .*out is in use by another run \(process \d+ on"):
            gen._sample_into(out, _sampler(images, calls), {"steps": 2}, run)
        assert calls == [] and sorted(p.name for p in tmp_path.iterdir()) == [".out.lock"]
    finally:
        os.close(held)
    assert gen._sample_into(out, _sampler(images, calls), {"steps": 2}, run) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the lock goes with the run


def test_a_resume_sees_a_lora_replaced_since_and_a_partial_without_images_starts_afresh(tmp_path):
    from types import SimpleNamespace

    import torch

    from t2i_align.errors import UserError

    gen = _script("generate")
    lora = tmp_path / "final"
    lora.mkdir()
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"1")
    model = tmp_path / "merged"  # a merge redone (merge_lora --overwrite) between the runs went unnoticed
    (model / "unet").mkdir(parents=True)
    (model / "model_index.json").write_text("{}")
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"1")
    args = SimpleNamespace(lora=str(lora), device="cuda:1", model=str(model))
    first = gen._run_record({"steps": 2}, ["a"], 1, args)
    assert first["device"] == "cuda" and first["lora_files"][0][:2] == ["pytorch_lora_weights.safetensors", 1]
    assert [f[:2] for f in first["model_files"]] == [["model_index.json", 2],
                                                     ["unet/diffusion_pytorch_model.safetensors", 1]]
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"22")  # a longer run wrote RUN/final since
    (model / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"22")
    again = gen._run_record({"steps": 2}, ["a"], 1, args)
    assert again["lora_files"] != first["lora_files"] and again["model_files"] != first["model_files"]
    (model / "scheduler").mkdir()  # a scheduler config edited, a final/ re-exported with another token budget
    (model / "scheduler" / "scheduler_config.json").write_text("{}")
    (lora / "t2i_align_text_encoding.json").write_text("{}")
    later = gen._run_record({"steps": 2}, ["a"], 1, args)
    assert later["model_files"][1][0] == "scheduler/scheduler_config.json" and len(later["lora_files"]) == 2
    # --vae and PPD's user table, recorded by path alone, were not checked either
    table = tmp_path / "users.safetensors"
    table.write_bytes(b"1")
    with_table = gen._run_record({"steps": 2}, ["a"], 1, SimpleNamespace(**vars(args), user_table=str(table)))
    table.write_bytes(b"22")
    assert gen._run_record({"steps": 2}, ["a"], 1, SimpleNamespace(**vars(args), user_table=str(table)))[
        "input_files"] == [[str(table), 2, table.stat().st_mtime_ns]] != with_table["input_files"]
    # a partial started before session 36 recorded the weight files only: it still resumes, and still sees them
    old = {k: v for k, v in later.items() if k != "files_version"}
    old.update(lora_files=later["lora_files"][:1], model_files=later["model_files"][2:], images=2, batch_size=1)
    images, calls = torch.rand(2, 3, 8, 8), []
    with pytest.raises(KeyboardInterrupt):
        gen._sample_into(tmp_path / "old", _sampler(images, calls, stop=1), {}, old)
    assert old["lora_files"][0][0] == "pytorch_lora_weights.safetensors" and len(old["model_files"]) == 1
    assert gen._sample_into(tmp_path / "old", _sampler(images, calls), {}, {**later, "images": 2, "batch_size": 1},
                            resume=True) == 2
    (tmp_path / "old").rename(tmp_path / "old.partial")  # unfinished again, its weights replaced since
    (json_path := tmp_path / "old.partial" / gen.MADE_BY).write_text(json.dumps({"finished": False, "run": old}))
    (lora / "pytorch_lora_weights.safetensors").write_bytes(b"333")
    replaced = {**gen._run_record({"steps": 2}, ["a"], 1, args), "images": 2, "batch_size": 1}
    with pytest.raises(UserError, match="lora_files differ"):
        gen._sample_into(tmp_path / "old", _sampler(images, calls), {}, replaced, resume=True)
    assert json_path.is_file()
    part = tmp_path / "out.partial"  # killed (SIGKILL: no clean-up) before its first image
    part.mkdir()
    (part / gen.MADE_BY).write_text(json.dumps({"finished": False, "run": first}))
    assert gen._sample_into(tmp_path / "out", _sampler(torch.rand(1, 3, 8, 8), []), {}, {"images": 1}) == 1
    assert not part.exists()


def test_a_resume_makes_the_rest_in_the_batches_of_an_uninterrupted_run(tmp_path):
    """A kill mid-batch kept 3 images of batches of 2: resuming at image 3 made [3, 4] a batch where the
    uninterrupted run made [2, 3] one (batch-size numerics: images a pixel level apart). It resumes at 2."""
    import torch

    gen, images, calls = _script("generate"), torch.rand(4, 3, 8, 8), []
    out, run = tmp_path / "out", {"steps": 2, "batch_size": 2, "images": 4}
    with pytest.raises(KeyboardInterrupt):
        gen._sample_into(out, _sampler(images, calls, stop=3), {"steps": 2}, run)
    assert gen._sample_into(out, _sampler(images, calls), {"steps": 2}, run, resume=True) == 4
    assert calls == [0, 2] and len((out / "metadata.jsonl").read_text().splitlines()) == 4


def test_generate_keeps_its_images_when_publishing_fails(tmp_path, monkeypatch, capsys):
    """A full disk at the final rename kept nothing (the images were in a temporary folder); now --resume
    publishes them without sampling again. A failure before the first image leaves no folder."""
    import torch

    import t2i_align.files as files

    gen, images, calls = _script("generate"), torch.rand(2, 3, 8, 8), []
    out, run = tmp_path / "out", {"images": 2, "batch_size": 4}  # all made: none cut back to a whole batch

    def full_disk(tmp, out):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(files, "replace_dir", full_disk)
        with pytest.raises(OSError, match="No space left"):
            gen._sample_into(out, _sampler(images, calls), {}, run)
    assert "2 of 2 images are kept" in capsys.readouterr().err
    assert gen._sample_into(out, _sampler(images, calls), {}, run, resume=True) == 2 and calls == [0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(KeyboardInterrupt):
        gen._sample_into(tmp_path / "none", _sampler(images, calls, stop=0), {}, run)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and "kept" not in capsys.readouterr().err


def test_compare_refuses_a_single_image_pair_before_sampling(tmp_path, monkeypatch, capsys):
    """One prompt at --seeds-per-prompt 1 sampled both models, then failed in compare_scores (TooFewScores)."""
    import t2i_align.evaluation as evaluation

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    one = tmp_path / "one.txt"
    one.write_text("a large red circle at the top left on a white background\n")
    args = ["--prompts", "toy:heldout", "--prompts", str(one), "--seeds-per-prompt", "1"]
    assert _script("common").run_cli(lambda: _script("compare").main(args)) == 2
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --prompts {one}: 1 prompt at --seeds-per-prompt 1 makes one image pair, and a comparison needs at "
        "least 2: give more prompts or --seeds-per-prompt 2 or more")


def test_script_results_print_as_strict_json(capsys):
    """compare.py printed `"t": Infinity` (a constant paired difference): not JSON to strict readers."""
    assert _script("common").run_cli(lambda: {"t": float("inf"), "p_value": 0.0, "std": float("nan")}) == 0
    assert json.loads(capsys.readouterr().out, parse_constant=lambda token: pytest.fail(token)) == {
        "t": None, "p_value": 0.0, "std": None}


def test_compare_refuses_a_batch_direction_before_sampling(monkeypatch, capsys):
    """Each batch is scored as it is made: decomposed-clip's direction=batch would score the sides against
    different batch means wherever their batches differ."""
    import t2i_align.evaluation as evaluation

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    args = ["--reward", "decomposed-clip", "--option", "decomposed-clip.checkpoint=toy",
            "--option", "decomposed-clip.direction=batch"]
    assert _script("common").run_cli(lambda: _script("compare").main(args)) == 2
    assert "decomposed-clip with direction=batch scores each image against its batch's mean" in capsys.readouterr().err


def test_generate_refuses_a_link_or_mount_point_as_out_before_sampling(prompts, tmp_path, monkeypatch, capsys):
    """The final rename of --out aside fails for both (`Is a directory`, `Device or resource busy`): every image
    was sampled and then lost."""
    import os

    import t2i_align.evaluation as evaluation

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    run, gen = _script("common").run_cli, _script("generate")
    (tmp_path / "real").mkdir()
    os.symlink(tmp_path / "real", tmp_path / "link")
    monkeypatch.setattr(os.path, "ismount", lambda path: str(path).endswith("volume"))
    for out, kind in ((tmp_path / "link", "link"), (tmp_path / "volume", "mount point")):
        assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out)])) == 2
        assert f"--out {out} is a {kind}, which generate.py cannot replace whole" in capsys.readouterr().err


def test_generate_overwrite_keeps_files_it_did_not_write(prompts, tmp_path, capsys):
    """A t2i-score output saved inside a generated folder went with it on --overwrite."""
    run, gen = _script("common").run_cli, _script("generate")
    out = tmp_path / "samples"
    gen.main(["--prompts", str(prompts), "--out", str(out), *FAST])
    (out / "scores.jsonl").write_text("the user's scores\n")
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out), "--overwrite", *FAST])) == 2
    assert "holds files generate.py did not write (scores.jsonl)" in capsys.readouterr().err
    assert (out / "scores.jsonl").read_text() == "the user's scores\n"
    (out / "scores.jsonl").unlink()
    (out / ".git").mkdir()  # a hidden entry that is the user's: it went with the folder
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out), "--overwrite", *FAST])) == 2
    assert "did not write (.git)" in capsys.readouterr().err and (out / ".git").is_dir()
    (out / ".git").rmdir()
    (out / ".DS_Store").write_bytes(b"a file browser's")  # a file browser's leftovers are no one's work
    assert run(lambda: gen.main(["--prompts", str(prompts), "--out", str(out), "--overwrite", *FAST])) == 0


def test_gallery_overwrite_replaces_only_a_gallery(prompts, tmp_path, monkeypatch, capsys):
    """--overwrite deleted any OUT/gallery folder, a user's photos too."""
    import t2i_align.evaluation as evaluation

    monkeypatch.setattr(evaluation, "sample_model", _unsampled)
    photos = tmp_path / "pics" / "gallery" / "holiday"
    photos.mkdir(parents=True)
    (photos / "beach.jpg").write_bytes(b"a photo")
    run = _script("common").run_cli
    argv = ["--prompts", str(prompts), "--out", str(tmp_path / "pics"), "--overwrite", *FAST]
    assert run(lambda: _script("gallery").main(argv)) == 2
    assert "holds files but no grid.png" in capsys.readouterr().err and (photos / "beach.jpg").is_file()


def test_wandb_gallery_panels_hold_at_most_100_images():
    """W&B keeps the first 108 images of a logged list: a 16-prompt gallery lost its last prompts' images."""
    import numpy as np

    from t2i_align.tracking import PANEL_IMAGES, Tracker

    logged = {}
    tracker = Tracker("unused", enabled=False)
    tracker._wandb = type("Run", (), {"log": lambda self, data, step: logged.update(data)})()
    rows = [{"prompt": f"p{i}", "images": [np.zeros((8, 8, 3), np.uint8)] * 4} for i in range(40)]
    tracker._log_wandb_gallery(rows, 0, None, "gallery")
    sizes = {key: len(value) for key, value in logged.items() if key != "gallery/table"}
    assert sizes == {"gallery/images": PANEL_IMAGES, "gallery/images_2": 60} and PANEL_IMAGES <= 108


def test_a_killed_generate_keeps_its_images_and_resume_finishes_them(prompts, tmp_path):
    """SIGTERM: the images made so far stay in OUT.partial (before session 26 a kill kept nothing, and a hidden
    temporary folder of images stayed for good before that); --resume makes the rest, the images an uninterrupted
    run makes."""
    import signal
    import subprocess
    import time

    many, out, part = tmp_path / "many.txt", tmp_path / "samples", tmp_path / "samples.partial"
    lines = [line for line in prompts.read_text().splitlines() if line] * 20
    many.write_text("\n".join(lines) + "\n")
    args = ["--prompts", str(many), "--out", str(out), "--steps", "2", "--batch-size", "1", "--seeds-per-prompt", "1"]
    proc = subprocess.Popen([sys.executable, str(SAMPLE / "generate.py"), *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while not (part / "metadata.jsonl").is_file() or not (part / "metadata.jsonl").read_text():
        assert proc.poll() is None and time.time() < deadline, proc.stderr.read().decode()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 128 + signal.SIGTERM
    assert "images are kept in" in proc.stderr.read().decode() and not out.exists()
    done = len(_script("generate")._whole_images(part))
    assert 0 < done < len(lines)
    assert _script("generate").main([*args, "--resume"])["images"] == len(lines)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["many.txt", "prompts.txt", "samples"]
    assert len((out / "metadata.jsonl").read_text().splitlines()) == len(lines)
    # the first done + 2 images, made in one run: the same PNGs
    few = tmp_path / "few.txt"
    few.write_text("\n".join(lines[:done + 2]) + "\n")
    _script("generate").main(["--prompts", str(few), "--out", str(tmp_path / "ref"), *args[4:]])
    assert all((out / f"{i:05d}.png").read_bytes() == (tmp_path / "ref" / f"{i:05d}.png").read_bytes()
               for i in range(done + 2))


@pytest.mark.parametrize("scheduler, steps", [("ddim", 1000), ("euler", 1001)])
def test_more_steps_than_the_scheduler_has_is_one_error_line(prompts, tmp_path, capsys, scheduler, steps):
    """--steps 1001 on a 1000-timestep model: DDIM's ValueError, Euler's and DPM++'s IndexError, as tracebacks;
    DDIM's leading spacing (steps_offset 1) fails at 1000 already."""
    args = ["--prompts", str(prompts), "--steps", str(steps), "--seeds-per-prompt", "1", "--scheduler", scheduler,
            "--out", str(tmp_path / "out")]
    assert _script("common").run_cli(lambda: _script("generate").main(args)) == 2
    err = capsys.readouterr().err
    assert f"error: {steps} sampling steps are more than this model's scheduler (1000 timesteps) can take" in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_gallery_refuses_a_training_runs_folder(tmp_path, capsys):
    """`--out RUN --overwrite` replaced the run's validation gallery (both hold a grid.png)."""
    run = tmp_path / "run"
    (run / "gallery").mkdir(parents=True)
    (run / "gallery" / "grid.png").write_bytes(b"the run's")
    (run / "metrics.jsonl").write_text("{}\n")
    args = ["--out", str(run), "--overwrite", "--reward", "", *FAST]
    assert _script("common").run_cli(lambda: _script("gallery").main(args)) == 2
    assert "is a training run's folder" in capsys.readouterr().err
    assert (run / "gallery" / "grid.png").read_bytes() == b"the run's"
    young = tmp_path / "young"  # a run that has not written its gallery yet: the run's would replace the user's
    young.mkdir()
    (young / "config.yaml").write_text("model:\n  pretrained: toy\nobjective:\n  name: dpo\ntrain:\n  max_steps: 9\n")
    assert _script("common").run_cli(lambda: _script("gallery").main(["--out", str(young), "--reward", "",
                                                                       *FAST])) == 2
    assert "is a training run's folder" in capsys.readouterr().err and not (young / "gallery").exists()


def test_outputs_inside_a_model_or_lora_folder_are_refused(tmp_path, capsys):
    """generate.py wrote RUN/final/samples, which the run's next export (a longer run) replaced whole with
    final/; gallery.py likewise (compare.py already refused it)."""
    lora = tmp_path / "final"
    lora.mkdir()
    weights = lora / "pytorch_lora_weights.safetensors"
    weights.write_bytes(b"")
    (lora / "t2i_align_base_model.json").write_text("{}")  # what marks an export (a LoRA file elsewhere is fine)
    for script, flags in (("generate", ["--out", str(lora / "samples")]),
                          ("gallery", ["--out", str(lora / "g"), "--reward", ""])):
        for given in (lora, weights):  # the folder, or the weights file in it
            code = _script("common").run_cli(lambda: _script(script).main(["--lora", str(given), *flags, *FAST]))
            assert code == 2 and f"lies inside --lora {lora}" in capsys.readouterr().err
    assert sorted(lora.iterdir()) == [weights, lora / "t2i_align_base_model.json"]


def test_compare_and_the_toy_commands_refuse_an_empty_out(tmp_path, monkeypatch, capsys):
    """compare --out "" wrote no JSON without a word; toy build / demo --out "" took the working directory."""
    from t2i_align.toy.__main__ import main as toy

    compare = _script("compare")
    monkeypatch.setattr(compare, "load_reward_set", lambda *a: pytest.fail("rewards loaded"))
    monkeypatch.chdir(tmp_path)
    code = _script("common").run_cli(lambda: compare.main(["--prompts", "toy:heldout", "--out", ""]))
    assert code == 2 and capsys.readouterr().err.strip() == ("error: --out is empty: give a path (an empty one would "
                                                             "be taken as the working directory)")
    for command in ("build", "demo"):
        assert toy([command, "--out", ""]) == 2
        assert capsys.readouterr().err.strip().endswith("error: --out is empty: give a path (an empty one would be "
                                                        "taken as the working directory)")
    assert not list(tmp_path.iterdir())
