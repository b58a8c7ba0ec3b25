"""Sampling for a user (PPD): generate() passes user tokens to the pipeline, final/ exports (adapters, or a full
model with the branch saved beside it), and sample/generate.py / compare.py pick users, interpolate and fail
clearly."""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align.conditioning import users as ub
from t2i_align.users import UserTable
from test_sample_scripts import _script

DIM, TOKENS = 6, 3
FAST = ["--steps", "2", "--seeds-per-prompt", "1", "--guidance", "3.0"]


def _perturb(params, seed=3):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in params:
            p.add_(0.3 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_tiny_pipeline("sd15", tmp_path_factory.mktemp("m") / "pipe")


def _pipe(model):
    from t2i_align.sampling import load_pipeline

    return load_pipeline(model)


@pytest.fixture(scope="module")
def ppd_final(model, tmp_path_factory):
    """final/ as a PPD run writes it: a trained (here: perturbed) branch and the user table, no LoRA."""
    from t2i_align.checkpoints import export_final

    pipe = _pipe(model)
    _perturb(ub.add_user_branch(pipe.unet, DIM, TOKENS))
    table = UserTable([1, 2, "zoe"], torch.randn(3, TOKENS, DIM, generator=torch.Generator().manual_seed(1)))
    out = tmp_path_factory.mktemp("run")
    return export_final(pipe, pipe.unet, True, out, user_table=table)


def _generate(pipe, tokens=None, guidance=3.0):
    from t2i_align.sampling import generate

    return generate(pipe, ["a cat", "a photo"], [0, 1], num_inference_steps=2, guidance_scale=guidance,
                    user_tokens=tokens).images


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_generate_with_user_tokens_is_the_base_at_init_and_scale_zero(model, guidance):
    pipe = _pipe(model)
    base = _generate(pipe, guidance=guidance)
    params = ub.add_user_branch(pipe.unet, DIM, TOKENS)
    tokens = torch.randn(2, TOKENS, DIM)
    assert torch.equal(_generate(pipe, tokens, guidance), base)
    _perturb(params)
    assert not torch.allclose(_generate(pipe, tokens, guidance), base, atol=1e-4)
    ub.set_user_scale(pipe.unet, 0.0)
    assert torch.equal(_generate(pipe, tokens, guidance), base)
    with pytest.raises(ValueError, match="1 rows of user tokens for 2 prompts"):
        _generate(pipe, tokens[:1])


def test_full_fine_tune_export_keeps_the_branch_out_of_unet(model, tmp_path):
    from diffusers import StableDiffusionPipeline

    from t2i_align.checkpoints import export_final

    pipe = _pipe(model)
    _perturb(ub.add_user_branch(pipe.unet, DIM, TOKENS))
    x, t, h, tok = torch.randn(1, 4, 8, 8), torch.tensor([400]), torch.randn(1, 77, 32), torch.randn(1, TOKENS, DIM)
    with torch.no_grad():
        before = pipe.unet(x, t, h, added_cond_kwargs=ub.user_added_cond(tok)).sample
    final = export_final(pipe, pipe.unet, False, tmp_path)
    with torch.no_grad():
        assert torch.equal(pipe.unet(x, t, h, added_cond_kwargs=ub.user_added_cond(tok)).sample, before)
    plain = StableDiffusionPipeline.from_pretrained(str(final))  # loads: no ip_image_proj inside unet/
    assert plain.unet.encoder_hid_proj is None and (final / ub.USER_WEIGHT_NAME).is_file()
    plain.load_ip_adapter(str(final), subfolder="", weight_name=ub.USER_WEIGHT_NAME, image_encoder_folder=None)
    with torch.no_grad():
        again = plain.unet(x, t, h, added_cond_kwargs={"image_embeds": [tok[:, None]]}).sample
    assert torch.allclose(again, before, atol=1e-6)


def _gen_cli(model, final, out, *extra):
    return _script("generate").main(["--model", str(model), "--lora", str(final), "--prompts",
                                     str(out.parent / "p.txt"), "--out", str(out), *FAST, *extra])


def _pngs(folder):
    import numpy as np
    from PIL import Image

    return [np.asarray(Image.open(p)) for p in sorted(folder.glob("*.png"))]


def test_generate_cli_samples_for_users_interpolates_and_scales(model, ppd_final, tmp_path):
    (tmp_path / "p.txt").write_text("a cat\na photo\n")
    one = _gen_cli(model, ppd_final, tmp_path / "u1", "--user", "1")
    assert one["images"] == 2
    meta = json.loads((tmp_path / "u1" / "metadata.jsonl").read_text().splitlines()[0])
    assert meta["user"]["ids"] == ["1"]
    _gen_cli(model, ppd_final, tmp_path / "zoe", "--user", "zoe")
    _gen_cli(model, ppd_final, tmp_path / "mix0", "--user", "1", "--user", "zoe", "--alpha", "0")
    _gen_cli(model, ppd_final, tmp_path / "mix1", "--user", "1", "--user", "zoe", "--alpha", "1")
    _gen_cli(model, ppd_final, tmp_path / "off", "--user", "1", "--user-scale", "0")
    _gen_cli(model, ppd_final, tmp_path / "none", "--user-scale", "0")  # as README says: no user needed (refused)
    _script("generate").main(["--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--out",
                              str(tmp_path / "base"), *FAST])
    u1, zoe, base = _pngs(tmp_path / "u1"), _pngs(tmp_path / "zoe"), _pngs(tmp_path / "base")
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "mix0"), u1))  # α = 0: the first user
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "mix1"), zoe))  # α = 1: the second
    assert any((a != b).any() for a, b in zip(u1, zoe))
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "off"), base))  # scale 0: the base model
    assert all((a == b).all() for a, b in zip(_pngs(tmp_path / "none"), base))


def test_a_table_of_every_layer_is_cut_to_the_layers_the_branch_took(model, ppd_final, tmp_path):
    """A new user's table from `users embed` holds every VLM layer; a branch trained with ppd.layers (last, or a
    count k) takes the last k: sampling cuts the table's tokens to those (its 5 tokens against the branch's 3 were
    refused before session 22, so users unseen in training could not be sampled)."""
    from t2i_align.sampling import load_pipeline
    from t2i_align.users.inference import UserChoice, user_tokens_for

    trained = UserTable.load(ppd_final / "user_table.safetensors").embeddings[:1]  # user 1's [1, 3, DIM]
    earlier = torch.randn(1, 2, DIM, generator=torch.Generator().manual_seed(5)).to(trained.dtype)
    path = UserTable([1], torch.cat([earlier, trained], dim=1)).save(tmp_path / "every_layer.safetensors")
    pipe = load_pipeline(model, ppd_final)
    with pytest.warns(UserWarning, match="has 5 rows and the branch takes 3: using the last 3"):
        tokens = user_tokens_for(pipe, UserChoice(ids=["1"], table=str(path)), 2, [ppd_final, model])
    assert torch.equal(tokens, trained.repeat(2, 1, 1))
    # --user-table as the folder holding the table, as --lora takes a run's final/ ("no user table at" it before)
    folder = user_tokens_for(pipe, UserChoice(ids=["1"], table=str(ppd_final)), 2, [model])
    assert torch.equal(folder, trained.repeat(2, 1, 1))
    with pytest.raises(FileNotFoundError, match="set --user-table to the"):  # not training's ppd.table
        user_tokens_for(pipe, UserChoice(ids=["1"], table=str(tmp_path / "none.safetensors")), 2, [model])


@pytest.mark.parametrize("extra, message", [
    ((), "pass --user ID"),
    (("--user", "42"), "user '42' is not in the user table (3 users: 1, 2, 'zoe')"),
    (("--user", "1", "--user", "2"), "needs two --user ids and --alpha"),
    (("--user", "1", "--user-table", "WIDE"), "shape (1, 3, 8); this UNet's user branch takes [batch, 3, 6]"),
    (("--user=--1",), "user '--1' is not in the user table"),  # int("--1") raised a traceback
    (("--user", "1", "--user", "2", "--alpha", "nan"), "--alpha nan: give a finite number"),
    (("--user", "1", "--user-scale", "nan"), "--user-scale nan: must be a finite number >= 0"),
    (("--user-shots", "SHOTS", "--alpha", "0.5"), "--alpha and --user-table do not apply to it"),  # were ignored
])
def test_generate_cli_user_mistakes_are_one_line_errors(model, ppd_final, tmp_path, capsys, extra, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    wide = UserTable([1], torch.zeros(1, TOKENS, 8)).save(tmp_path / "wide.safetensors")
    extra = [str(wide) if e == "WIDE" else str(tmp_path / "shots.parquet") if e == "SHOTS" else e for e in extra]
    run = _script("common").run_cli
    assert run(lambda: _gen_cli(model, ppd_final, tmp_path / "x", *extra)) == 2
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]  # above it: diffusers' loading progress bars
    assert last.startswith("error: ") and message in last and "Traceback" not in err


def test_a_user_for_a_model_without_a_branch_is_an_error(model, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a cat\n")
    run = _script("common").run_cli
    code = run(lambda: _script("generate").main(["--model", str(model), "--prompts", str(tmp_path / "p.txt"),
                                                 "--out", str(tmp_path / "x"), "--user", "1", *FAST]))
    assert code == 2 and "no user branch" in capsys.readouterr().err
    code = run(lambda: _script("generate").main(["--model", str(model), "--prompts", str(tmp_path / "p.txt"),
                                                 "--out", str(tmp_path / "x"), "--alpha", "0.5", *FAST]))
    assert code == 2 and "no user branch" in capsys.readouterr().err  # --alpha alone was not checked


def test_compare_reports_per_user(model, ppd_final, tmp_path, monkeypatch):
    from t2i_align import evaluation

    calls, real = [], evaluation.sample_model

    def recording(model, lora, *args, user=None, **kwargs):  # who each side samples for
        calls.append((lora, None if user is None else user.ids))
        return real(model, lora, *args, user=user, **kwargs)

    monkeypatch.setattr(evaluation, "sample_model", recording)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle at the top left on a white background\n")
    result = _script("compare").main(["--model", str(model), "--lora", str(ppd_final), "--prompts", str(prompts),
                                      "--user", "1", "--user", "zoe", "--reward", "toy-judge", "--steps", "2",
                                      "--seeds-per-prompt", "2"])
    assert sorted(result["sets"]) == [f"{prompts} · user 1", f"{prompts} · user zoe"]
    # per user: the tuned side (with the branch) for that user first, then the base (no branch, no user), whose
    # images are the same for every user: sampled once
    assert calls == [(str(ppd_final), ["1"]), (None, None), (str(ppd_final), ["zoe"])]
    for block in result["sets"].values():
        assert block["images_per_model"] == 2 and "toy-judge" in block["rewards"]
    base = [block["rewards"]["toy-judge"]["base"] for block in result["sets"].values()]
    assert base[0] == base[1]


def test_generate_cli_embeds_a_toy_user_from_shots(tmp_path, capsys):
    """--user-shots: 4 labelled pairs -> the toy encoder's [4, 64] tokens -> a toy UNet's branch; 3 pairs fail."""
    import random

    from t2i_align.checkpoints import export_final
    from t2i_align.sampling import load_pipeline
    from t2i_align.toy.pairs import jpeg_bytes, write_parquet
    from t2i_align.toy.scenes import Scene, render

    pipe = load_pipeline("toy")
    _perturb(ub.add_user_branch(pipe.unet, 64, 4))
    final = export_final(pipe, pipe.unet, True, tmp_path / "run")
    rng = random.Random(0)
    rows = [{"caption": "a large red circle at the top left",
             "jpg_0": jpeg_bytes(render(Scene("red", "circle", "large", "top left", "white"), rng)),
             "jpg_1": jpeg_bytes(render(Scene("red", "circle", "large", "top left", "black"), rng)),
             "label_0": 1.0, "label_1": 0.0, "user_id": 0, "are_different": True, "has_label": True,
             "model_0": "r", "model_1": "r", "ranking_id": i} for i in range(4)]
    write_parquet(rows, tmp_path / "shots.parquet")
    write_parquet(rows[:3], tmp_path / "three.parquet")
    (tmp_path / "p.txt").write_text("a small blue square at the bottom right\n")
    args = ["--model", "toy", "--lora", str(final), "--prompts", str(tmp_path / "p.txt"), *FAST]
    gen = _script("generate")
    result = gen.main([*args, "--out", str(tmp_path / "s"), "--user-shots", str(tmp_path / "shots.parquet")])
    assert result["images"] == 1
    # the same pairs with the opposite preference (the black background): another user, other images
    write_parquet([dict(r, label_0=0.0, label_1=1.0) for r in rows], tmp_path / "swapped.parquet")
    gen.main([*args, "--out", str(tmp_path / "w"), "--user-shots", str(tmp_path / "swapped.parquet")])
    images = [np.asarray(Image.open(tmp_path / run / "00000.png")) for run in ("s", "w")]
    assert not np.array_equal(*images)
    assert json.loads((tmp_path / "s" / "metadata.jsonl").read_text())["user"]["shots"].endswith("shots.parquet")
    code = _script("common").run_cli(lambda: gen.main([*args, "--out", str(tmp_path / "t"), "--user-shots",
                                                       str(tmp_path / "three.parquet")]))
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 2 and "have [3] shots; each needs 4" in last


def test_merging_a_ppd_final_keeps_its_user_branch_and_table(model, ppd_final, tmp_path, monkeypatch):
    """train/merge_lora.py on a PPD final/ wrote the branch into unet/ (a folder that plain diffusers cannot load)
    and left the user table behind."""
    from t2i_align.merge import merge_lora
    from t2i_align.sampling import load_pipeline
    from t2i_align.users.inference import UserChoice, user_tokens_for

    merged = merge_lora(model, ppd_final, tmp_path / "merged")
    assert sorted(p.name for p in merged.glob("user_*.safetensors")) == ["user_branch.safetensors",
                                                                       "user_table.safetensors"]
    images = []
    for m, lora in ((model, ppd_final), (merged, None)):
        pipe = load_pipeline(m, lora=lora)
        images.append(_generate(pipe, user_tokens_for(pipe, UserChoice(ids=["1"]), 2, (lora, m))))
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)
    # a LoRA tuned on the merged model, merged onto it named as ~/merged: the model folder's table, found where the
    # model loads from, comes along
    from helpers import export_random_lora

    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.warns(UserWarning, match="was trained on"):  # on the base: the same UNet shapes, no branch
        again = merge_lora("~/merged", export_random_lora(model, tmp_path / "lora"), tmp_path / "again")
    assert (again / "user_table.safetensors").read_bytes() == (merged / "user_table.safetensors").read_bytes()


@pytest.mark.parametrize("given", ["root", "unet"])
def test_a_full_ppd_export_merged_as_unet_keeps_its_user_branch_and_table(model, tmp_path, given):
    """`merge_lora.py --unet RUN/final` of a full-fine-tuning PPD run left the branch and table beside unet/
    behind: the merged folder sampled no user (since session 26 they load from the checkpoint's folder)."""
    from t2i_align.checkpoints import export_final
    from t2i_align.merge import merge_lora
    from t2i_align.sampling import load_pipeline
    from t2i_align.users.inference import UserChoice, user_tokens_for

    pipe = _pipe(model)
    _perturb(list(ub.add_user_branch(pipe.unet, DIM, TOKENS)) + list(pipe.unet.parameters())[:4])
    table = UserTable([1, 2], torch.randn(2, TOKENS, DIM, generator=torch.Generator().manual_seed(1)))
    final = export_final(pipe, pipe.unet, False, tmp_path / "run", user_table=table)
    merged = merge_lora(model, None, tmp_path / "merged", unet=final if given == "root" else final / "unet")
    assert sorted(p.name for p in merged.glob("user_*.safetensors")) == ["user_branch.safetensors",
                                                                       "user_table.safetensors"]
    images = []
    for m in (final, merged):
        pipe = load_pipeline(m)
        images.append(_generate(pipe, user_tokens_for(pipe, UserChoice(ids=["2"]), 2, (None, m))))
    torch.testing.assert_close(images[1], images[0], rtol=0, atol=1e-5)


def test_a_merge_takes_the_user_table_of_the_lora_else_of_the_model(tmp_path):
    from t2i_align.merge import _user_table

    lora, model = tmp_path / "final", tmp_path / "ppd-full"
    lora.mkdir()
    model.mkdir()
    assert _user_table(model, lora, None) is None
    (model / "user_table.safetensors").write_text("")
    assert _user_table(model, lora / "pytorch_lora_weights.safetensors", None) == model / "user_table.safetensors"
    (lora / "user_table.safetensors").write_text("")
    assert _user_table(model, lora, None) == lora / "user_table.safetensors"
    # the model's folder is given as check_weights resolved it (`~/m`, a hub id's download): merge_lora's tests


def test_a_model_with_a_branch_sampled_without_a_user_is_a_clear_error(model, ppd_final):
    """`python -m t2i_align.toy evaluate --lora PPD_FINAL` ended in a TypeError inside diffusers' UNet."""
    from t2i_align.conditioning.users import UserBranchError
    from t2i_align.sampling import load_pipeline

    with pytest.raises(UserBranchError, match="has a PPD user branch, so it samples for a user, and none was given"):
        _generate(load_pipeline(model, lora=ppd_final))


def test_gallery_samples_a_ppd_model_for_a_user(model, ppd_final, tmp_path, capsys):
    """gallery.py had no --user: a PPD model could not be shown at all (its error said to pass --user, which the
    script refused), and the base column was sampled before the tuned side failed."""
    (tmp_path / "p.txt").write_text("a cat\na photo\n")
    args = ["--model", str(model), "--lora", str(ppd_final), "--prompts", str(tmp_path / "p.txt"), "--reward", "",
            "--steps", "2", "--seeds-per-prompt", "1"]
    result = _script("gallery").main([*args, "--user", "zoe", "--out", str(tmp_path / "g")])
    assert result["images_per_model"] == 2 and (tmp_path / "g" / "gallery" / "grid.png").is_file()
    run = _script("common").run_cli
    assert run(lambda: _script("gallery").main([*args, "--out", str(tmp_path / "h")])) == 2
    assert "pass --user ID" in capsys.readouterr().err
    no_branch = ["--model", str(model), "--prompts", str(tmp_path / "p.txt"), "--reward", "", "--out",
                 str(tmp_path / "i")]
    assert run(lambda: _script("gallery").main([*no_branch, "--user", "1"])) == 2
    assert "no model here has a PPD user branch" in capsys.readouterr().err


def test_a_merged_ppd_model_under_home_samples_and_compares_for_a_user(model, ppd_final, tmp_path, monkeypatch,
                                                                          capsys):
    """`--model ~/merged`: the branch loaded from the expanded path, the user table was looked up beside the
    unexpanded one (no user_table.safetensors next to the weights), and compare.py dropped the user. With --user
    and no other --base, compare.py compares the model with itself: now noted, as without --user."""
    from t2i_align.merge import merge_lora

    monkeypatch.setenv("HOME", str(tmp_path))
    merge_lora(model, ppd_final, tmp_path / "merged")
    (tmp_path / "p.txt").write_text("a cat\n")
    prompts = ["--prompts", str(tmp_path / "p.txt"), "--steps", "2", "--seeds-per-prompt", "2"]
    assert _script("generate").main(["--model", "~/merged", "--user", "1", "--out", str(tmp_path / "u"),
                                     *prompts])["images"] == 2
    result = _script("compare").main(["--model", "~/merged", "--user", "1", "--reward", "toy-clip", *prompts])
    assert "is compared with itself" in capsys.readouterr().err
    assert result["sets"][f"{tmp_path / 'p.txt'} · user 1"]["rewards"]["toy-clip"]["win_rate"]["win_rate"] == 0.5


def test_generate_keeps_no_autograd_graph_with_trainable_parts(model):
    """generate() lost its no_grad once (a helper took its decorator): a pipeline whose VAE and text encoder are
    trainable, a plain diffusers one, then kept every batch's decode graph."""
    from t2i_align.sampling import load_pipeline

    pipe = load_pipeline(model)
    pipe.vae.requires_grad_(True)
    pipe.text_encoder.requires_grad_(True)
    assert not _generate(pipe).requires_grad


def test_an_alpha_outside_0_1_is_warned_as_extrapolation(tmp_path):
    from t2i_align.users.inference import UserChoice, user_embedding

    path = UserTable([1, 2], torch.randn(2, 3, 4)).save(tmp_path / "t.safetensors")
    with pytest.warns(UserWarning, match="--alpha 2.0 is outside .0, 1.: it extrapolates"):
        mixed = user_embedding(UserChoice(ids=["1", "2"], alpha=2.0, table=str(path)), [])
    table = UserTable.load(path)
    assert torch.allclose(mixed, 2 * table.embedding(2) - table.embedding(1))  # alpha·B + (1 - alpha)·A
