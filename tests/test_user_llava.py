"""PPD stage 1 (t2i_align/users/llava.py, embed.py, __main__.py) with a tiny random LLaVA-OneVision of the real
transformers classes: the official prompt verbatim, the embedding = last decoding step's token from every layer,
the sharded / resumable embed command, and the shots-vs-training-pairs check."""
import json
import math
import os
import sys

import numpy as np
import pytest
import torch

from helpers import one_torch_thread  # noqa: F401
from t2i_align.toy.pairs import jpeg_bytes, write_parquet
from t2i_align.errors import UserError
from t2i_align.users import UserTable
from t2i_align.users.__main__ import main as users_main
from t2i_align.users.embed import embed_users, load_shots, merge_parts, read_part
from t2i_align.data.pairs import PairDataset
from t2i_align.users.llava import LabelledPair, LlavaUserEncoder, pad_to_square, ppd_question, qwen_chat

PAD = " " * 24
TWO_SHOT_QUESTION = (
    "You will be shown a few examples of preferred and dispreferred images. \n\nHere is the 1st pair of images: "
    "\n\nHere is the caption: a red cat \n\n<image> This is the preferred image. \n\n<image> This is the "
    "dispreferred image. \n\nHere is the 2st pair of images: \n\nHere is the caption: two dogs \n\n<image> This is "
    "the preferred image. \n\n<image> This is the dispreferred image. \n\nYou will be judging the images according "
    "to their style, visual quality, and image aesthetics. Follow the instructions below to compare the images:\n"
    f"{PAD}1. For each pair of images, describe the preferred image and the dispreferred image. \n"
    f"{PAD}2. Explain the differences between the two images in terms of style, visual quality, and image "
    "aesthetics.\n"
    f"{PAD}3. After you have described all of the images, summarize the differences between the preferred and "
    "dispreferred images into a user profile. \n\n"
    f"{PAD}Format your response as follows for the two pairs of images:\n"
    f"{PAD}Pair 1:\n{PAD}Preferred Image: [Description]\n{PAD}Dispreferred Image: [Description]\n"
    f"{PAD}Differences: [Description]\n\n"
    f"{PAD}Pair 2:\n{PAD}Preferred Image: [Description]\n{PAD}Dispreferred Image: [Description]\n"
    f"{PAD}Differences: [Description]\n\n"
    f"{PAD}User Profile: [Description]")


def test_the_official_prompt_verbatim_with_its_quirks():
    assert ppd_question(["a red cat", "two dogs"]) == TWO_SHOT_QUESTION
    four = ppd_question(["a", "b", "c", "d"])
    assert "Here is the 4st pair of images:" in four and "for the four pairs of images:" in four
    assert four.count("<image>") == 8 and four.endswith("User Profile: [Description]")
    assert "for the four pairs of images:" in ppd_question(["a", "b", "c"])  # sic, as the official prompt
    with pytest.raises(ValueError, match="2, 3, 4, 5"):
        ppd_question(["a"])
    assert qwen_chat("Q") == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nQ"
                              "<|im_end|>\n<|im_start|>assistant\n")


def test_pad_to_square_centres_the_image_on_the_fill_colour():
    image = np.zeros((1, 3, 3), dtype=np.uint8)  # 1 high, 3 wide, black
    square = np.asarray(pad_to_square(image, (10, 20, 30)))
    assert square.shape == (3, 3, 3)
    assert (square[1] == 0).all() and (square[0] == [10, 20, 30]).all() and (square[2] == [10, 20, 30]).all()


LLAVA_CONFIG = '{"model_type": "llava_onevision"}'
"""config.json enough for `users embed`'s check of the --model folder."""


def _tiny_llava(folder):
    """A random LLaVA-OneVision (SigLIP + Qwen2, 2 layers, width 32) with a word-level tokenizer, saved."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              PreTrainedTokenizerFast, Qwen2Config, SiglipVisionConfig)

    words = sorted(set(TWO_SHOT_QUESTION.replace("\n", " ").split()))
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>", "[UNK]"]
    vocab = {w: i for i, w in enumerate(specials + [w for w in words if w not in specials])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", eos_token="<|im_end|>",
                                        pad_token="<|endoftext|>",
                                        additional_special_tokens=["<|im_start|>", "<|im_end|>", "<image>", "<video>"])
    grid = [[32, 32], [32, 64], [64, 32], [64, 64]]  # anyres could tile an image: PPD's images must not be
    images = LlavaOnevisionImageProcessor(size={"height": 32, "width": 32}, crop_size={"height": 32, "width": 32},
                                          image_grid_pinpoints=grid)
    processor = LlavaOnevisionProcessor(image_processor=images, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=16,
                                        vision_feature_select_strategy="full")
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=2, image_size=32, patch_size=8).to_dict(),
        text_config=Qwen2Config(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1).to_dict(),
        image_token_index=vocab["<image>"], image_grid_pinpoints=grid, vision_feature_select_strategy="full",
        vision_feature_layer=-1)
    torch.manual_seed(0)
    model = LlavaOnevisionForConditionalGeneration(config)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    return _tiny_llava(tmp_path_factory.mktemp("llava"))


def _shots(rng, n=2, size=(24, 16)):
    img = lambda: rng.integers(0, 255, (*size, 3), dtype=np.uint8)  # noqa: E731 (non-square: padded)
    return [LabelledPair(f"caption {i}", img(), img()) for i in range(n)]


def test_each_image_is_one_tile_as_in_ppds_pad_mode(tiny_llava):
    """PPD's LLaVA-NeXT "pad" mode encodes each of a prompt's images as one base tile and a newline: here 16
    patches + 1 per image. The images went to the processor as a flat list until session 22: each then counted
    as a sample of its own and was tiled (anyres), 352 image tokens for these four 64 x 48 images, not 68."""
    encoder = LlavaUserEncoder.from_pretrained(str(tiny_llava), device="cpu", dtype=torch.float32, max_new_tokens=2)
    inputs = encoder.inputs(_shots(np.random.default_rng(0), size=(64, 48)))
    image_token = encoder.processor.tokenizer.convert_tokens_to_ids("<image>")
    assert int((inputs["input_ids"] == image_token).sum()) == 4 * (16 + 1)
    assert inputs["batch_num_images"].tolist() == [4]
    assert encoder.encode(_shots(np.random.default_rng(0), size=(64, 48))).shape == (3, 32)  # the model takes them


def test_the_embedding_is_the_last_decoding_steps_token_from_every_layer(tiny_llava):
    encoder = LlavaUserEncoder.from_pretrained(str(tiny_llava), device="cpu", dtype=torch.float32, max_new_tokens=4)
    shots = _shots(np.random.default_rng(0))
    result = encoder.encode_with_text(shots)
    assert result.embedding.shape == (3, 32)  # embedding output + 2 layers (the last after the final norm)
    assert isinstance(result.text, str)
    assert torch.equal(encoder.encode(shots), result.embedding)  # greedy: deterministic

    # The same states from one plain forward over prompt + generated tokens: the last step's input token is the
    # second-to-last token of the output sequence.
    inputs = encoder.inputs(shots)
    sequences = encoder.model.generate(**inputs, do_sample=False, max_new_tokens=4)
    assert sequences.shape[1] == inputs["input_ids"].shape[1] + 4
    forward = dict(inputs, input_ids=sequences[:, :-1], attention_mask=torch.ones_like(sequences[:, :-1]))
    with torch.no_grad():
        states = encoder.model(**forward, output_hidden_states=True).hidden_states
    expected = torch.cat([layer[:, -1] for layer in states])
    torch.testing.assert_close(result.embedding, expected, atol=1e-4, rtol=1e-4)
    other = encoder.encode(_shots(np.random.default_rng(1)))
    assert not torch.allclose(other, result.embedding)  # the shots reach the embedding


def _write_pairs(path, rows_per_user, bad=(), seed=0):
    """Pick-a-Pic-format pairs: `rows_per_user` {user: n}; rows listed in `bad` ((user, k)) get broken bytes."""
    rng, rows = np.random.default_rng(seed), []
    for user, n in rows_per_user.items():
        for k in range(n):
            jpg = [jpeg_bytes(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)) for _ in range(2)]
            if (user, k) in bad:
                jpg[0] = b"not a jpeg"
            rows.append({"caption": f"user {user} prompt {k}", "jpg_0": jpg[0], "jpg_1": jpg[1], "label_0": 1.0,
                         "label_1": 0.0, "user_id": user, "are_different": True, "has_label": True,
                         "model_0": "m", "model_1": "m", "ranking_id": len(rows)})
    write_parquet(rows, path)
    return path


def test_embed_command_shards_resumes_and_writes_a_user_table(tiny_llava, tmp_path, capsys, monkeypatch):
    pairs = _write_pairs(tmp_path / "shots.parquet", {7: 5, 8: 4, 9: 2, None: 4}, bad={(8, 1)})  # None: no rater
    out = tmp_path / "users"
    encoder = LlavaUserEncoder.from_pretrained(str(tiny_llava), device="cpu", dtype=torch.float32, max_new_tokens=2)
    data = PairDataset(pairs, resolution=8)
    # two "processes" share the users; user 8 has one undecodable row (3 usable pairs), user 9 only 2 pairs
    first = embed_users(encoder, data, out, num_shots=4, rank=0, world=2, progress=False)
    second = embed_users(encoder, data, out, num_shots=4, rank=1, world=2, progress=False)
    assert first["embedded"] + second["embedded"] == 1  # user 7 only: 8 has 3 decodable pairs, 9 has 2
    assert first["too_few_pairs"] + second["too_few_pairs"] == 2 and first["rows_skipped"] + second["rows_skipped"] == 1
    again = embed_users(encoder, data, out, num_shots=4, rank=0, world=1, progress=False)
    assert again["already_done"] == 1 and again["embedded"] == 0  # resumed: nothing redone
    summary = merge_parts(out)
    assert summary == {"users": 1, "tokens": 3, "width": 32}
    # Processes on machines without a shared file system: they report users whose parts are not here
    with pytest.raises(UserError, match="holds 1 user parts, but the processes embedded 2"):
        merge_parts(out, handled=2)
    assert merge_parts(out, handled=1) == summary
    # a torn part (a host crash, a bad copy): the merge names it, and a resume embeds that user again
    (part,) = (out / "parts").glob("user-*.safetensors")
    user, embedding, meta = read_part(part)
    part.write_bytes(part.read_bytes()[:40])
    with pytest.raises(UserError, match="user-.*safetensors is a damaged user part"):
        merge_parts(out)
    redo = embed_users(encoder, data, out, num_shots=4, rank=0, world=1, progress=False)
    again_user, again_embedding, again_meta = read_part(part)
    assert (redo["embedded"], redo["already_done"]) == (1, 0) and (again_user, again_meta) == (user, meta)
    assert torch.equal(again_embedding, embedding)
    table = UserTable.load(out / "user_table.safetensors")
    assert table.ids == (7,) and table.embeddings.dtype == torch.float16
    shots = load_shots(out / "users.json")
    assert len(shots[7]) == 4 and len(set(shots[7])) == 4

    # The CLI end to end (one process) gives the same table; then the training pairs are checked against the shots.
    assert users_main(["embed", "--model", str(tiny_llava), "--pairs", str(pairs), "--out", str(tmp_path / "cli"),
                       "--max-new-tokens", "2", "--dtype", "fp32"]) == 0
    cli_table = UserTable.load(tmp_path / "cli" / "user_table.safetensors")
    assert cli_table.ids == (7,) and torch.equal(cli_table.embeddings, table.embeddings)
    # continuing into the same --out with other settings would mix two kinds of embedding in one table
    assert users_main(["embed", "--model", str(tiny_llava), "--pairs", str(pairs), "--out", str(tmp_path / "cli"),
                       "--max-new-tokens", "3", "--dtype", "fp32"]) == 2
    assert "holds users embedded with other settings (max_new_tokens: 2 -> 3)" in capsys.readouterr().err
    # refused before the 7B model loads on every process; pairs regenerated at the same path are other pairs
    monkeypatch.setattr(LlavaUserEncoder, "from_pretrained", lambda *a, **k: pytest.fail("loaded the model"))
    kept = pairs.read_bytes()
    _write_pairs(pairs, {7: 5, 8: 3})
    assert users_main(["embed", "--model", str(tiny_llava), "--pairs", str(pairs), "--out", str(tmp_path / "cli"),
                       "--max-new-tokens", "2", "--dtype", "fp32"]) == 2
    assert "holds users embedded with other settings (pairs_files: " in capsys.readouterr().err
    pairs.write_bytes(kept)
    os.utime(pairs, ns=(1, 1))  # a copy or a touch: the same data, not refused (the model then loads)
    with pytest.raises(pytest.fail.Exception, match="loaded the model"):
        users_main(["embed", "--model", str(tiny_llava), "--pairs", str(pairs), "--out", str(tmp_path / "cli"),
                    "--max-new-tokens", "2", "--dtype", "fp32"])
    monkeypatch.undo()
    assert users_main(["check-shots", "--shots", str(out / "users.json"), "--pairs", str(pairs)]) == 2
    assert "were also shots of the same user's embedding" in capsys.readouterr().err
    other = _write_pairs(tmp_path / "train.parquet", {7: 3, 8: 3}, seed=1)  # other images: no shot among them
    assert users_main(["check-shots", "--shots", str(out / "users.json"), "--pairs", str(other)]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["overlaps"] == 0


def test_embed_command_errors_are_one_clear_line(tmp_path, capsys):
    assert users_main(["embed", "--model", str(tmp_path / "nope"), "--pairs", "x", "--out", str(tmp_path)]) == 2
    assert "is not a folder" in capsys.readouterr().err
    # another model (transformers' message pointed to the hub), or a folder without config.json
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", "x", "--out", str(tmp_path / "o")]) == 2
    assert f"--model {tmp_path} has no readable config.json" in capsys.readouterr().err
    (tmp_path / "config.json").write_text('{"model_type": "clip"}')
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", "x", "--out", str(tmp_path / "o")]) == 2
    assert "is a 'clip' model (its config.json), not LLaVA-OneVision" in capsys.readouterr().err
    (tmp_path / "config.json").write_text(LLAVA_CONFIG)
    with pytest.raises(SystemExit) as exit_info:  # argparse rejects it before anything loads
        users_main(["embed", "--model", "m", "--pairs", "p", "--out", "o", "--num-shots", "6"])
    assert exit_info.value.code == 2 and "invalid choice: 6" in capsys.readouterr().err
    # users[:-1] embedded every user but the last, without a word
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", "x", "--out", "o", "--max-users", "-1"]) == 2
    assert "--max-users -1: give a number >= 0" in capsys.readouterr().err
    # a table no run's parts/ is beside (a training run's final/, parts/ deleted) was replaced without a word
    final = tmp_path / "run" / "final"
    final.mkdir(parents=True)
    (final / "user_table.safetensors").write_bytes(b"the run's table")
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", "x", "--out", str(final)]) == 2
    assert "user_table.safetensors exists without the" in capsys.readouterr().err
    assert (final / "user_table.safetensors").read_bytes() == b"the run's table"
    # the missing file named by its flag (the pairs' message told a training run to set data.path)
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", "x", "--out", str(tmp_path / "o")]) == 2
    assert "error: --pairs x does not exist: give a Pick-a-Pic-format parquet" in capsys.readouterr().err
    assert users_main(["check-shots", "--shots", str(tmp_path / "u.json"), "--pairs", "x"]) == 2
    assert f"error: --shots {tmp_path / 'u.json'} does not exist" in capsys.readouterr().err


def test_a_transformers_too_old_is_a_user_error(tmp_path, monkeypatch):
    """It was an ImportError, which `users embed` does not catch: a traceback instead of its `error:` line."""
    import transformers

    monkeypatch.setattr(transformers, "__version__", "4.50.0")
    with pytest.raises(UserError, match=r"need transformers >= 4.53 \(installed: 4.50.0\)"):
        LlavaUserEncoder.from_pretrained(str(tmp_path))


def _with_user_ids(path, ids):
    """The pair file with its user_id column replaced by `ids` (of another type than Pick-a-Pic's int64)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path)
    pq.write_table(table.set_column(table.schema.get_field_index("user_id"), "user_id", pa.array(ids)), path)
    return path


class _FailingEncoder:
    """Stands in for LLaVA: user 8's embedding is NaN, user 9 runs out of GPU memory, others embed (user 10's
    beyond fp16's range)."""

    def encode_with_text(self, shots):
        from t2i_align.users.llava import LlavaEmbedding

        user = shots[0].caption.split()[1]
        if user == "9":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return LlavaEmbedding(torch.full((3, 4), {"8": math.nan, "10": 7e4}.get(user, 1.0)), "profile")


def test_a_user_that_fails_is_counted_and_the_others_embedded(tmp_path, caplog):
    """An out-of-memory user or an embedding that is not finite was fatal: the first stopped the run (and every
    resume at the same user), the second was written and then failed the merge for good. One beyond fp16's range
    failed with advice (another --dtype) that could not help: it is kept in fp32."""
    pairs = _write_pairs(tmp_path / "p.parquet", {7: 2, 8: 2, 9: 2, 10: 2})
    out = tmp_path / "users"
    counts = embed_users(_FailingEncoder(), PairDataset(pairs, resolution=8), out, num_shots=2, progress=False)
    assert counts["embedded"] == 2 and counts["failed"] == 2
    assert "user 8 not embedded: its embedding is not finite (NaN or inf in torch.float32)" in caplog.text
    assert "user 9 not embedded: out of memory (CUDA out of memory." in caplog.text
    assert merge_parts(out) == {"users": 2, "tokens": 3, "width": 4}  # the failed users left no part behind
    assert "the embeddings of 1 user(s) (first: 10) exceed fp16's range (65504), so the table is fp32" in caplog.text
    from t2i_align.users.table import UserTable

    table = UserTable.load(out / "user_table.safetensors")
    assert table.embeddings.dtype == torch.float32 and table.embedding(10).max().item() == 7e4


def test_embed_exits_1_when_users_failed(tmp_path, monkeypatch):
    """The table lacked the failed users and the command exited 0: a script could not tell."""
    import t2i_align.users.embed as embed

    (tmp_path / "config.json").write_text(LLAVA_CONFIG)
    args = ["embed", "--model", str(tmp_path), "--pairs", "p", "--out", str(tmp_path / "o")]
    for failed, code in ((2, 1), (0, 0)):
        monkeypatch.setattr(embed, "run_embed", lambda *a, failed=failed: {"users": 1, "failed": failed})
        assert users_main(args) == code


def test_ctrl_c_in_the_users_command_is_one_line(tmp_path, capsys, monkeypatch):
    """Ctrl-C during `users embed` (hours of VLM decoding) printed a traceback; now one line, and the process ends
    by SIGINT as the other commands do."""
    import t2i_align.users.embed as embed

    def interrupted(*args):
        raise KeyboardInterrupt
    monkeypatch.setattr(embed, "run_embed", interrupted)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # run_cli quiets the interrupt's traceback
    (tmp_path / "config.json").write_text(LLAVA_CONFIG)
    with pytest.raises(KeyboardInterrupt):
        users_main(["embed", "--model", str(tmp_path), "--pairs", "p", "--out", str(tmp_path / "o")])
    sys.excepthook(KeyboardInterrupt, KeyboardInterrupt(), None)  # what Python calls then: prints nothing
    assert capsys.readouterr().err == "\nstopped (Ctrl-C)\n"


def test_user_ids_read_as_whole_floats_are_the_ints_and_others_refused(tmp_path, capsys):
    """pandas makes an int column with gaps float64 (7.0): those ids are the ints, as the table keeps them; they
    failed only at the merge, after the whole VLM pass. A fractional id is refused before anything loads."""
    from t2i_align.users.embed import _by_user

    pairs = _with_user_ids(_write_pairs(tmp_path / "p.parquet", {7: 2, 8: 1}), [7.0, 7.0, 8.0])
    assert _by_user(PairDataset(pairs, resolution=8)) == {7: [0, 1], 8: [2]}
    assert all(type(u) is int for u in _by_user(PairDataset(pairs, resolution=8)))
    odd = _with_user_ids(_write_pairs(tmp_path / "odd.parquet", {7: 2}), [7.5, 7.5])
    (tmp_path / "config.json").write_text(LLAVA_CONFIG)
    assert users_main(["embed", "--model", str(tmp_path), "--pairs", str(odd), "--out", str(tmp_path / "o")]) == 2
    assert "row 0: user_id 7.5 (float); a user table's ids are ints or text" in capsys.readouterr().err


def test_check_shots_refuses_to_pass_when_the_id_types_differ(tmp_path, capsys):
    """Training pairs whose ids are text ("7") against shots of int users (7): nothing could match, and the check
    printed "overlaps: 0", a pass, having compared no pair. Users new to the training set (int ids both sides, no
    pair of theirs) are disjoint by construction: a pass, with a note that nothing was compared."""
    from t2i_align.users.embed import USERS_JSON

    (tmp_path / USERS_JSON).write_text(json.dumps({"users": {"7": {"text": "", "shots": ["x"]}}}))
    pairs = _with_user_ids(_write_pairs(tmp_path / "train.parquet", {7: 2}), ["7", "7"])
    assert users_main(["check-shots", "--shots", str(tmp_path / USERS_JSON), "--pairs", str(pairs)]) == 2
    assert "their ids are str, the embedded users' int (e.g. 7)" in capsys.readouterr().err
    others = _write_pairs(tmp_path / "others.parquet", {8: 2})
    assert users_main(["check-shots", "--shots", str(tmp_path / USERS_JSON), "--pairs", str(others)]) == 0
    assert "nothing to compare (users new to this training set?)" in capsys.readouterr().err
    # pandas writes ids 8.0 beside a missing one: the same ids embed reads as ints, new users, no type mismatch
    floats = _with_user_ids(_write_pairs(tmp_path / "floats.parquet", {8: 2}), [8.0, None])
    assert users_main(["check-shots", "--shots", str(tmp_path / USERS_JSON), "--pairs", str(floats)]) == 0
