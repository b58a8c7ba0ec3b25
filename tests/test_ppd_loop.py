"""PPD through the training loop (Dang et al., CVPR 2025, arXiv 2501.06655): the user branch is the base bit for bit
through the loop's own denoisers, user ids reach the batches (unknown users skipped and counted), and a tiny run
exports a final/ that plain diffusers' `load_ip_adapter` reloads to the trained outputs."""
import json
import math
import random
import warnings

import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align.config import load_config
from t2i_align.toy.pairs import jpeg_bytes, write_parquet
from t2i_align.toy.scenes import noisy_scene, render, short_caption, split_scenes
from t2i_align.users import UserTable

USER_DIM, TOKENS = 6, 3


def write_user_pairs(path, users, n=8, seed=0, corrupt_users=()):
    """Rendered pairs (winner = the captioned scene) whose rows cycle through `users` as user_id; the winners of
    `corrupt_users`' rows are not images."""
    rng = random.Random(seed)
    scenes, _ = split_scenes()
    rows = []
    for i in range(n):
        scene = rng.choice(scenes)
        win, lose = (jpeg_bytes(render(s, rng, 16)) for s in (scene, noisy_scene(scene, rng, 1.0, keep=())))
        win = b"not an image" if users[i % len(users)] in corrupt_users else win
        rows.append({"caption": short_caption(scene), "jpg_0": win, "jpg_1": lose, "label_0": 1.0, "label_1": 0.0,
                     "user_id": users[i % len(users)], "are_different": True, "has_label": True,
                     "model_0": "render", "model_1": "render", "ranking_id": i})
    write_parquet(rows, path)
    return path


def write_table(path, ids, seed=0):
    g = torch.Generator().manual_seed(seed)
    return UserTable(ids, torch.randn(len(ids), TOKENS, USER_DIM, generator=g)).save(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ppd")
    model = save_tiny_pipeline("sd15", root / "pipe")
    data = write_user_pairs(root / "pairs.parquet", users=[1, 2, 3, 99])  # 99: not in the table
    table = write_table(root / "users.safetensors", [1, 2, 3])
    return model, data, table, root


def _cfg(setup, out, *extra):
    model, data, table, _ = setup
    return load_config(None, [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}",
                              "data.resolution=16", "train.batch_size=4", "train.learning_rate=1e-2",
                              "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1",
                              "ppd.enabled=true", f"ppd.table={table}", "objective.beta=100", *extra])


def test_branch_is_the_base_bit_for_bit_through_the_loops_denoisers(setup):
    """At init and at scale 0, make_denoiser's output with user tokens equals the plain UNet's; the reference
    provider's denoiser (every adapter off) equals it after the branch has moved."""
    from t2i_align.batches import make_denoiser
    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.conditioning.users import set_user_scale
    from t2i_align.models import load_components
    from t2i_align.references import BaseReference, SnapshotPool
    from t2i_align.users.training import add_ppd_branch

    cfg = _cfg(setup, setup[3] / "unused")
    components = load_components(cfg.model)
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 800])
    embeds = PromptEmbeds(torch.randn(2, 77, 32, generator=g))
    with torch.no_grad():
        base = make_denoiser(components.unet, components)(x, t, embeds)
        components.unet.requires_grad_(False)
        params = add_ppd_branch(components, cfg.ppd)
        embeds.user_tokens = components.users.table.tokens([1, 3])
        policy = make_denoiser(components.unet, components)
        assert torch.equal(policy(x, t, embeds), base)
        for p in params:
            p.add_(0.1 * torch.randn(p.shape, generator=g))
        assert not torch.allclose(policy(x, t, embeds), base, atol=1e-5)
        reference = BaseReference(components.unet, components, True, None).denoiser()
        assert torch.equal(reference(x, t, embeds), base)
        pool = SnapshotPool(components.unet, components, True, None, snapshot_every=1, pool_size=2, draw="initial",
                            seed=0, output_dir=setup[3])  # its functional_call path, with the same kwargs
        pool.tensors[0] = {n: torch.zeros_like(p) if ".to_v_ip." in n else p.clone()
                           for n, p in pool.tensors[0].items()}  # the zero-initialised branch as the snapshot
        pool.begin_step(0)
        assert torch.equal(pool.denoiser()(x, t, embeds), base)
        set_user_scale(components.unet, 0.0)
        assert torch.equal(policy(x, t, embeds), base)
    with pytest.raises(ValueError, match="no user tokens"):
        policy(x, t, PromptEmbeds(embeds.prompt_embeds))


@pytest.mark.parametrize("cache", ["false", "true"])
def test_tiny_ppd_run_leaves_out_unknown_users_and_exports_what_plain_diffusers_loads(setup, tmp_path, monkeypatch,
                                                                                       cache):
    from diffusers import StableDiffusionPipeline
    from safetensors import safe_open

    import t2i_align.conditioning.users as users_module
    from t2i_align.conditioning.users import USER_WEIGHT_NAME, pipeline_user_embeds, user_added_cond
    from t2i_align.loop import train
    from t2i_align.users.training import UserLookup, batch_user_ids

    seen, original = [], UserLookup.batch_tokens
    monkeypatch.setattr(UserLookup, "batch_tokens",
                        lambda self, raw, device=None: seen.append(batch_user_ids(raw)) or original(self, raw, device))
    reached = []  # (batch number, the user tokens that reach the UNet)
    monkeypatch.setattr(users_module, "user_added_cond",
                        lambda tokens, unet=None: reached.append((len(seen), tokens.clone())) or
                        user_added_cond(tokens, unet))
    out = tmp_path / "run"
    result = train(_cfg(setup, out, "train.max_steps=2", "train.log_every=1", "train.checkpoint_every=2",
                        f"data.cache={cache}", f"data.cache_dir={tmp_path / 'cache'}"))
    logs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # zero-init branch, reference = base; 1e-5: the two forwards round apart in the last bits (a loser MSE 1e-7
    # apart, times beta 100: 2e-6 with the packages of session 35, under 1e-6 before)
    assert logs[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)
    # 8 pairs, rows 3 and 7 of user 99, who is not in the table: left out before batching, so each batch holds
    # train.batch_size = 4 pairs of known users (the batches held 3 before session 26)
    assert [len(ids) for ids in seen] == [4, 4] and all(99 not in ids for ids in seen)
    table = UserTable.load(setup[2])  # each pair conditioned on its own user, winner and loser alike ([w; l])
    steps = [(n, tokens) for n, tokens in reached if n in (1, 2) and len(tokens) == 8]
    assert {n for n, _ in steps} == {1, 2}
    for n, tokens in steps:
        assert torch.equal(tokens, table.tokens(seen[n - 1]).repeat(2, 1, 1))
    assert logs[-1]["data_rows_skipped"] == 0.0 and "data_rows_unknown_user" not in logs[-1]
    with safe_open(str(out / "checkpoints" / "step-2" / "model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys and all("_ip." in k or k.startswith("encoder_hid_proj") for k in keys)  # the branch only
    final = result.final
    assert sorted(p.name for p in final.iterdir() if p.suffix == ".safetensors") == [
        USER_WEIGHT_NAME, "user_table.safetensors"]
    assert UserTable.load(final / "user_table.safetensors").ids == (1, 2, 3)
    pipe = StableDiffusionPipeline.from_pretrained(str(setup[0]))
    pipe.load_ip_adapter(str(final), subfolder="", weight_name=USER_WEIGHT_NAME, image_encoder_folder=None)
    tokens = UserTable.load(final / "user_table.safetensors").tokens([2])
    x, t, h = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 32)
    with torch.no_grad():
        trained = result.unet(x, t, h, added_cond_kwargs=user_added_cond(tokens)).sample
        loaded = pipe.unet(x, t, h, added_cond_kwargs={"image_embeds": pipeline_user_embeds(tokens, None, False)})
        base = StableDiffusionPipeline.from_pretrained(str(setup[0])).unet(x, t, h).sample
    assert torch.allclose(loaded.sample, trained, atol=1e-6)
    assert not torch.allclose(trained, base, atol=1e-6)


def test_resumed_ppd_run_with_embedding_dropout_matches_an_uninterrupted_one(setup, tmp_path):
    from t2i_align.loop import train

    common = ("train.log_every=1", "train.checkpoint_every=2", "ppd.dropout=0.5")
    train(_cfg(setup, tmp_path / "full", *common, "train.max_steps=4"))
    train(_cfg(setup, tmp_path / "part", *common, "train.max_steps=2"))
    train(_cfg(setup, tmp_path / "part", *common, "train.max_steps=4", "train.resume=latest"))
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("full", "part")]
    losses = [[r["loss"] for r in run] for run in logs]
    assert len(losses[0]) == 4 and losses[1] == pytest.approx(losses[0], abs=1e-6)


def test_lora_and_user_branch_train_together_and_both_are_exported(setup, tmp_path):
    from t2i_align.loop import train

    out = tmp_path / "both"
    result = train(_cfg(setup, out, "train.max_steps=2", "train.log_every=1", "lora.enabled=true", "lora.rank=2"))
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # reference: LoRA off AND branch off
    trainable = [n for n, p in result.unet.named_parameters() if p.requires_grad]
    assert all(".lora_" in n or "_ip." in n or n.startswith("encoder_hid_proj.") for n in trainable)
    for part in (".lora_A.", ".lora_B.", ".to_k_ip.", ".to_v_ip.", "encoder_hid_proj."):
        assert any(part in n for n in trainable), part
    names = {p.name for p in result.final.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "user_branch.safetensors", "user_table.safetensors"} <= names


def test_no_pair_of_a_known_user_or_no_user_column_is_a_clear_error(setup, tmp_path):
    from t2i_align.errors import UserError
    from t2i_align.loop import train
    from t2i_align.users.training import NoMatchingUsersError

    table = write_table(tmp_path / "strangers.safetensors", [7, 8])
    with pytest.raises(NoMatchingUsersError, match="none of the 8 pairs"):
        train(_cfg(setup, tmp_path / "a", f"ppd.table={table}", "train.max_steps=1"))
    import pyarrow.parquet as pq

    no_users = tmp_path / "no_users.parquet"
    pq.write_table(pq.read_table(setup[1]).drop(["user_id"]), no_users)
    with pytest.raises(UserError, match="has no user_id column"):  # found before the model loads
        train(_cfg(setup, tmp_path / "b", f"data.path={no_users}", "train.max_steps=1"))
    assert not (tmp_path / "a" / "final").exists() and not (tmp_path / "b" / "final").exists()


def test_ppd_config_checks():
    from t2i_align.config import ConfigError

    with pytest.raises(ConfigError, match="ppd.table"):
        load_config(None, ["ppd.enabled=true"])
    with pytest.raises(ConfigError, match="ppd.layers"):
        load_config(None, ["ppd.layers=first"])
    with pytest.raises(ConfigError, match="ppd.dropout"):
        load_config(None, ["ppd.dropout=1.0"])
    with pytest.raises(ConfigError, match="ppd.blocks.*mid_block"):
        load_config(None, ["ppd.blocks=[up,mid_block]"])
    assert load_config(None, ["ppd.enabled=true", "ppd.table=t", "ppd.blocks=[up_blocks.1]"]).ppd.blocks == [
        "up_blocks.1"]
    for other in ("objective.name=seppo", "objective.name=reward_backprop", "data.kind=captions"):
        # reward fine-tuning and caption data failed only after the model loaded ("no user ids", misleading)
        with pytest.raises(ConfigError, match="RAFT, SePPO and reward fine-tuning generate without users"):
            load_config(None, ["ppd.enabled=true", "ppd.table=t", other])
    cfg = load_config(None, ["ppd.enabled=true", "ppd.table=t", "ppd.layers=2"])
    assert cfg.ppd.layers == "2" and not cfg.full_finetune
    assert load_config(None, []).full_finetune and not load_config(None, ["lora.enabled=true"]).full_finetune


def test_a_resume_tells_when_the_user_table_changed_since_the_checkpoint(setup, tmp_path):
    """The same ppd.table path, another file (re-embedded users): the resume went on without a word."""
    import shutil

    from t2i_align.loop import train
    from t2i_align.users.training import TABLE_RECORD, file_sha256

    table = shutil.copy(setup[2], tmp_path / "users.safetensors")
    common = ("train.checkpoint_every=2", f"ppd.table={table}")
    train(_cfg(setup, tmp_path / "run", *common, "train.max_steps=2"))
    record = json.loads((tmp_path / "run" / "checkpoints" / "step-2" / TABLE_RECORD).read_text())
    assert record == {"table": str(table), "sha256": file_sha256(table)}
    with warnings.catch_warnings(record=True) as caught:  # the same file: not a word
        warnings.simplefilter("always")
        train(_cfg(setup, tmp_path / "run", *common, "train.max_steps=3", "train.resume=latest"))
    assert not [w for w in caught if "the checkpoint" in str(w.message)]
    write_table(table, [1, 2, 3], seed=1)
    with pytest.warns(UserWarning, match="is not the file the checkpoint .* trained with"):
        train(_cfg(setup, tmp_path / "run", *common, "train.max_steps=3", "train.resume=latest"))
