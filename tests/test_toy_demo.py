"""`make demo`'s progress reporting: sampling, pair export and evaluation report how many images are done."""
import json

import pytest
import torch
from PIL import Image

from t2i_align.sampling import generate, load_pipeline
from t2i_align.toy.evaluate import evaluate, prompt_set
from t2i_align.toy.pairs import export_pairs


@pytest.fixture(scope="module")
def toy_pipe():
    return load_pipeline("toy")


def test_generate_reports_each_batch(toy_pipe):
    done = []
    samples = generate(toy_pipe, ["a red circle"] * 5, [0, 1, 2, 3, 4], num_inference_steps=2, batch_size=2,
                       progress=done.append)
    assert done == [2, 2, 1] and len(samples.images) == 5


def test_out_of_memory_halves_the_batch_unless_sampling_is_collective(toy_pipe, monkeypatch):
    """Out of GPU memory a batch is retried at half the size; with retry_oom=False (FSDP, where every process
    must run the same forwards) the error is raised instead."""
    import t2i_align.sampling as sampling

    real, sizes = sampling._generate_chunk, []

    def chunk(pipe, components, prompts, seeds, **kwargs):
        sizes.append(len(prompts))
        if len(prompts) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return real(pipe, components, prompts, seeds, **kwargs)

    monkeypatch.setattr(sampling, "_generate_chunk", chunk)
    samples = generate(toy_pipe, ["a red circle"] * 5, list(range(5)), num_inference_steps=2, batch_size=4)
    assert sizes == [4, 2, 2, 1] and len(samples.images) == 5
    sizes.clear()  # halved from the batch that failed (5), not from 64: 64, 32, 16 and 8 each failed on 5 again
    generate(toy_pipe, ["a red circle"] * 5, list(range(5)), num_inference_steps=2, batch_size=64)
    assert sizes == [5, 2, 2, 1]
    with pytest.raises(torch.OutOfMemoryError):
        generate(toy_pipe, ["a red circle"] * 5, list(range(5)), num_inference_steps=2, batch_size=4,
                 retry_oom=False)


def test_batches_handed_on_are_the_images_not_kept(toy_pipe):
    """on_batch: each batch's images and latents go to the caller as made, the result keeps none (host memory:
    the latents alone were GBs over 10k SDXL images); they are what a plain call returns."""
    whole = generate(toy_pipe, ["a red circle", "a blue square"] * 2, [0, 1, 2, 3], num_inference_steps=2,
                     batch_size=3)
    batches = []
    kept = generate(toy_pipe, ["a red circle", "a blue square"] * 2, [0, 1, 2, 3], num_inference_steps=2,
                    batch_size=3, on_batch=batches.append)
    assert [b.seeds for b in batches] == [[0, 1, 2], [3]] and kept.images.shape[0] == kept.latents.numel() == 0
    assert torch.equal(torch.cat([b.images for b in batches]), whole.images)
    assert torch.equal(torch.cat([b.latents for b in batches]), whole.latents) and kept.prompts == whole.prompts


def test_images_decoded_to_nan_are_counted_and_warned_about(toy_pipe, monkeypatch):
    """A diverged model or an fp16 VAE overflowing gave NaN images that came out black, silently."""
    import t2i_align.sampling as sampling

    real = sampling._generate_chunk

    def nan_first(pipe, components, prompts, seeds, **kwargs):
        lat, img = real(pipe, components, prompts, seeds, **kwargs)
        img[0, 0, 0, 0] = float("nan")
        return lat, img

    monkeypatch.setattr(sampling, "_generate_chunk", nan_first)
    with pytest.warns(UserWarning, match="2 of 3 images of .* decoded to NaN pixels"):
        generate(toy_pipe, ["a red circle"] * 3, [0, 1, 2], num_inference_steps=2, batch_size=2)


def test_pair_export_reports_every_image_it_samples(toy_pipe, tmp_path):
    done = []
    counts = export_pairs(toy_pipe, prompt_set("train")[:3], tmp_path, images_per_prompt=2, prompts_per_batch=2,
                          pairing="best-worst", progress=done.append)
    assert done == [4, 2]  # 2 prompts x 2 images, then the last prompt's 2
    assert counts["pairs"] == 3


def test_a_pair_export_killed_before_its_counts_leaves_no_stale_counts(toy_pipe, tmp_path, monkeypatch):
    """A kill between the parquet and pairs.json left the new pairs beside the earlier export's counts."""
    import t2i_align.toy.pairs as pairs

    export_pairs(toy_pipe, prompt_set("train")[:2], tmp_path, images_per_prompt=2)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pairs, "write_text_atomic", killed)
    with pytest.raises(KeyboardInterrupt):
        export_pairs(toy_pipe, prompt_set("train")[:3], tmp_path, images_per_prompt=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pairs.parquet"]


def test_best_worst_pairing_of_equal_scores_is_a_tie_of_two_images():
    """All k images scoring the same gave one image twice: pairs.json counted a tie, training a 'same image'."""
    import random

    import numpy as np

    from t2i_align.toy.pairs import _pair_rows, jpeg_bytes

    images = [np.full((4, 4, 3), v, dtype=np.uint8) for v in (0, 80, 160, 240)]
    for seed in range(20):
        (row,) = _pair_rows("c", images, [0.6] * 4, random.Random(seed), "m", 0, pairing="best-worst")
        assert row["label_0"] == 0.5 and row["are_different"] and row["jpg_0"] != row["jpg_1"]
    (row,) = _pair_rows("c", images, [0.2, 0.9, 0.5, 0.3], random.Random(0), "m", 0, pairing="best-worst")
    assert row["label_0"] in (0.0, 1.0) and {row["jpg_0"], row["jpg_1"]} == {jpeg_bytes(images[1]),
                                                                           jpeg_bytes(images[0])}


def test_evaluate_reports_every_image_it_judges(toy_pipe):
    done = []
    result = evaluate(toy_pipe, prompt_set("heldout")[:5], seeds_per_prompt=2, steps=2, batch_size=4,
                      progress=done.append)
    assert done == [4, 4, 2] and len(result.verdicts) == 10


def test_demo_shows_a_bar_per_phase_and_a_headline(tmp_path, capsys, monkeypatch):
    from pathlib import Path

    from t2i_align.toy.__main__ import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])  # the default config path is relative to the repo
    assert main(["demo", "--out", str(tmp_path / "demo"), "--seeds", "1", "--k", "2", "--num-pair-prompts", "2",
                 "train.max_steps=2", "train.batch_size=2", "tracking.validation_seeds=1"]) == 0
    out, err = capsys.readouterr()
    for phase in ("pairs: sample 2 prompts x 2", "train", "judge base", "judge tuned"):
        assert phase in err, phase
    assert "4/4" in err and "60/60" in err  # the pair and evaluation bars reach their totals
    assert "held-out judge score: base" in err and "(paired t-test)" in err
    result = json.loads(out)
    assert result["config"] == "configs/toy/demo.yaml" and result["pairs"]["images_per_prompt"] == 2
    # what it leaves (this test once ran beside a second whole demo run that only checked these)
    demo = tmp_path / "demo"
    assert (demo / "gallery" / "index.html").is_file() and Image.open(demo / "gallery" / "grid.png").size[0] > 64
    assert (demo / "dpo" / "final" / "pytorch_lora_weights.safetensors").is_file()
    saved = json.loads((demo / "judge.json").read_text())
    assert saved["tuned"]["overall"]["mean"] == pytest.approx(result["tuned"]["overall"]["mean"])
    assert saved["base"]["num_prompts"] == 60 and saved["pairs"]["pairs"] == 2  # best vs worst per prompt
    wr = saved["win_rate"]
    assert wr == result["win_rate"] and wr["n"] == 60 and wr["wins"] + wr["losses"] + wr["ties"] == 60
    assert wr["win_rate"] == pytest.approx((wr["wins"] + 0.5 * wr["ties"]) / 60)  # ties count half
    assert f"tuned wins {wr['win_rate']:.3f} of 60 same-seed pairs" in err  # the headline shows the same rate


def test_demo_checks_its_overrides_before_sampling_pairs(tmp_path, capsys, monkeypatch):
    """A misspelt override was reported only after the pair sampling (minutes), as was a wrong value; data.path
    and output_dir replaced the demo's own, training on other data than judge.json reported."""
    from pathlib import Path

    import t2i_align.toy.demo as demo
    from t2i_align.toy.__main__ import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(demo, "export_pairs", lambda *a, **k: pytest.fail("sampled pairs before the config check"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "train.max_stepz=2"]) == 2
    assert "train.max_stepz" in capsys.readouterr().err and not (tmp_path / "demo").exists()
    for override, message in (("objective.name=dpoo", "LoRA DPO on the toy model, not objective.name=dpoo"),
                              ("objective.name=reward_backprop", "not objective.name=reward_backprop"),
                              ("data.path=x.parquet", "data.path=x.parquet: the demo sets data.path")):
        assert main(["demo", "--out", str(tmp_path / "demo"), override]) == 2
        assert message in capsys.readouterr().err and not (tmp_path / "demo").exists()
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", str(tmp_path / "no.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: --config {tmp_path / 'no.yaml'} not found"
    # fewer prompts than a batch failed after the sampling, in the training ("13 usable pairs are too few")
    assert main(["demo", "--out", str(tmp_path / "demo"), "--num-pair-prompts", "12"]) == 2
    assert "--num-pair-prompts 12 makes at most 12 pairs" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("config, why", [
    ("raft.yaml", "raft.enabled (RAFT trains on its own samples)"), ("online_dpo.yaml", "raft.enabled"),
    ("longalign_reward.yaml", "objective.name=reward_backprop; model.pretrained=runs/longalign-stage1/merged"),
    ("longalign_stage1.yaml", "objective.name=sft"), ("ppd.yaml", "ppd.enabled"),
    ("base.yaml", "lora.enabled=false (the demo loads a LoRA)")])
def test_demo_refuses_configs_of_methods_it_cannot_run(tmp_path, capsys, monkeypatch, config, why):
    """RAFT's configs passed and trained on RAFT's own samples, not the demo's pairs; a full fine-tune trained for
    minutes, then its export failed to load as a LoRA."""
    from pathlib import Path

    import t2i_align.toy.demo as demo
    from t2i_align.toy.__main__ import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(demo, "export_pairs", lambda *a, **k: pytest.fail("sampled pairs before the config check"))
    assert main(["demo", "--out", str(tmp_path / "demo"), "--config", f"configs/toy/{config}"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --config configs/toy/{config}: the demo runs LoRA DPO on the toy model, not")
    assert why in err
    assert "give configs/toy/demo.yaml, dpo.yaml or lora.yaml" in err and not (tmp_path / "demo").exists()


def test_demo_replaces_an_earlier_demo_only_with_overwrite(tmp_path, capsys, monkeypatch):
    """A second demo into the same folder replaced the first one's pairs, gallery and judge.json without a word."""
    from pathlib import Path

    import t2i_align.toy.demo as demo
    from t2i_align.toy.__main__ import main

    monkeypatch.chdir(Path(__file__).resolve().parents[1])
    monkeypatch.setattr(demo, "export_pairs", lambda *a, **k: pytest.fail("sampled before the output check"))
    earlier = tmp_path / "demo"
    (earlier / "pairs").mkdir(parents=True)
    (earlier / "pairs" / "pairs.parquet").write_bytes(b"the first demo's pairs")
    (earlier / "judge.json").write_text("{}")  # finished
    assert main(["demo", "--out", str(earlier)]) == 2
    assert "exists and --out" in capsys.readouterr().err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("not a demo")
    assert main(["demo", "--out", str(mine), "--overwrite"]) == 2
    assert "holds files but no pairs/pairs.parquet" in capsys.readouterr().err
    assert (earlier / "pairs" / "pairs.parquet").read_bytes() == b"the first demo's pairs"
    # a demo stopped while sampling its pairs left an empty pairs/ folder: the next one may go on there
    stopped = tmp_path / "stopped"
    (stopped / "pairs").mkdir(parents=True)

    class Reached(Exception):
        pass
    monkeypatch.setattr(demo, "export_pairs", lambda *a, **k: (_ for _ in ()).throw(Reached()))
    with pytest.raises(Reached):
        main(["demo", "--out", str(stopped)])
    # one stopped after its pairs (its training refused a setting, Ctrl-C), without judge.json, is redone too: the
    # rerun with the setting fixed was refused without --overwrite
    (stopped / "pairs" / "pairs.parquet").write_bytes(b"a stopped demo's pairs")
    with pytest.raises(Reached):
        main(["demo", "--out", str(stopped)])


def test_headline_reads_the_prompt_level_tests_when_there_are_several_seeds():
    """Differences 0.4, 0.2 | 0, 0.2 | 0.4, -0.2 at 2 seeds per prompt: prompt means 0.3, 0.1, 0.1, all won, so the
    sign test over the 3 prompts gives 2 · (1/2)³ = 0.25 (over the images: 4 wins, 1 loss, p = 2 · 6/32 = 0.375)."""
    from t2i_align.toy.demo import headline, tests_of

    tuned, base = [1.0, 0.8, 0.6, 0.6, 1.0, 0.4], [0.6, 0.6, 0.6, 0.4, 0.6, 0.6]
    out = tests_of(tuned, base, 2)
    assert out["per_prompt"]["sign"] == {"wins": 3, "losses": 0, "p_value": 0.25}
    assert out["win_rate"]["p_value"] == pytest.approx(0.375)
    line = headline({"base": {"overall": {"mean": 0.6}}, "tuned": {"overall": {"mean": 0.733}}, **out})
    assert "p over 3 prompts = 0.25 (sign test)" in line
    assert "per_prompt" not in tests_of(tuned, base, 1)  # one image per prompt: the images are the prompts
