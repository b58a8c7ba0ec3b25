"""Each objective, trained by the real loop, moves its own target: DPO's and SePPO's losses fall from ln 2 with
the implicit accuracy at 1, SFT's error falls, reward fine-tuning's reward rises, PPD fits two users' opposite
tastes on one pair where a user-blind DPO cannot (both rows share their draws, else a user-blind DPO fits them by
the draws; PPD on held-out users is benchmarks/toy_ppd.py's, README). The other
loop tests compare runs with each other (resume, micro-batches, engines) or check one step, so a loss whose sign
was flipped passed all of them (a reviewer negated `Accelerator.backward`'s loss: every test of test_loop.py passed).

The pairs come from the latent cache in a fixed order (each epoch's shuffle pinned) and the global RNG is reseeded
before each batch, so every step sees the same rows with the same noise and timesteps: the logged losses are then
one function of the weights, and must fall. The toy world's
judged, held-out evidence is in README (benchmarks/*_toy_runs.sh); this is the fast check of the direction."""
import json
import math

import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401  (fixture)
from t2i_align.config import load_config
from t2i_align.loop import train
from helpers import write_rendered_pairs


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    return write_rendered_pairs(tmp_path_factory.mktemp("data") / "pairs.parquet", n=4)


@pytest.fixture
def same_draws_every_step(monkeypatch):
    import t2i_align.loop as loop
    from t2i_align.data.sources import OfflineSource

    pinned = []

    def in_order(self, epoch):
        pinned.append(epoch)
        return self.rows[: self.batches_per_epoch * self.batch_size]
    monkeypatch.setattr(OfflineSource, "_epoch_indices", in_order)

    next_batch = loop._next_batch

    def reseeded(*args, **kwargs):
        torch.manual_seed(0)
        return next_batch(*args, **kwargs)
    monkeypatch.setattr(loop, "_next_batch", reseeded)
    return pinned  # the epochs served in order: the pairs tests' premise


def _run(out, *overrides):
    train(load_config(None, [f"output_dir={out}", "tracking.wandb=off", "tracking.validate_every=0",
                             "train.log_every=1", "train.lr_warmup_steps=0", "data.prompt_dropout=0", *overrides]))
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _pairs_run(out, model, data, *overrides):
    return _run(out, f"model.pretrained={model}", f"data.path={data}", "data.resolution=16", "train.batch_size=4",
                "data.cache=true", f"data.cache_dir={out.parent / 'cache'}", *overrides)


def test_dpo_and_seppo_raise_the_preferred_images_likelihood(tiny_model, pairs, tmp_path, same_draws_every_step):
    lora = ("lora.enabled=true", "lora.rank=4", "objective.beta=100", "train.learning_rate=1e-2",
            "train.max_steps=12")
    for name, extra, end in (("dpo", (), 0.3), ("seppo", ("seppo.sample_steps=2", "seppo.guidance_scale=1"), 0.3)):
        records = _pairs_run(tmp_path / name, tiny_model, pairs, f"objective.name={name}", *lora, *extra)
        assert same_draws_every_step, "the pairs were not served by the cached source in a pinned order"
        losses = [r["loss"] for r in records]
        assert losses[0] == pytest.approx(math.log(2), abs=1e-3)  # policy = reference before the first update
        assert losses[-1] < end and max(losses[3:]) < losses[0], (name, losses)  # measured: 0.156, 0.130
        assert records[-1]["implicit_acc"] >= 0.75  # measured 1.0 for both


def test_sft_lowers_its_error_on_the_preferred_images(tiny_model, pairs, tmp_path, same_draws_every_step):
    losses = [r["mse"] for r in _pairs_run(tmp_path / "sft", tiny_model, pairs, "objective.name=sft",
                                           "train.learning_rate=1e-3", "train.max_steps=10")]
    assert same_draws_every_step, "the pairs were not served by the cached source in a pinned order"
    assert losses[-1] < 0.3 * losses[0] and max(losses[1:]) < losses[0], losses  # measured 1.18 -> 0.17


def test_reward_fine_tuning_raises_its_reward(tmp_path, same_draws_every_step):
    """The toy model, one prompt twice (an order that changes cannot pair it with other noise), the toy CLIP."""
    prompts = tmp_path / "p.txt"
    prompts.write_text("a large red circle in the top left on a black background\n" * 2)
    records = _run(tmp_path / "rb", "objective.name=reward_backprop", "data.kind=prompts", f"data.path={prompts}",
                   "reward_backprop.reward=toy-clip", "reward_backprop.num_steps=4", "reward_backprop.grad_mode=last",
                   "reward_backprop.grad_k=1", "lora.enabled=true", "lora.rank=4", "train.learning_rate=1e-4",
                   "data.resolution=32",
                   "train.max_steps=8", "train.batch_size=2")
    rewards = [r["reward"] for r in records]
    assert rewards[-1] > rewards[0] + 3 and min(rewards[1:]) > rewards[0], rewards  # measured 63.0 -> 68.4


@pytest.fixture
def rows_share_draws(monkeypatch):
    """Every row of a batch gets row 0's noise and timestep, and the VAE its posterior mean: rows holding the same
    images are then the same training example, whatever the RNG does."""
    import diffusers.models.autoencoders.vae as vae
    import t2i_align.diffusion as diffusion

    def first_row_for_all(draw):
        def drawn(*args, **kwargs):
            x = draw(*args, **kwargs)
            return x[:1].expand_as(x).clone()
        return drawn
    for name in ("sample_noise", "sample_timesteps"):
        monkeypatch.setattr(diffusion, name, first_row_for_all(getattr(diffusion, name)))
    monkeypatch.setattr(vae.DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)


def test_ppd_learns_opposite_tastes_that_a_user_blind_dpo_cannot(tiny_model, tmp_path, rows_share_draws,
                                                                  same_draws_every_step):
    """One image pair, user 1 preferring one image and user 2 the other, both in every batch with the same draws.
    Without the user, the two rows' DPO logits are z and -z, so their mean loss is at least ln 2 whatever the
    weights (the control); PPD conditions on each row's user and must get below it (the per-user target, not draws
    memorised: the draws are the same for both users)."""
    from test_ppd_loop import write_table
    from t2i_align.toy.pairs import write_parquet

    import pyarrow.parquet as pq

    row = pq.read_table(write_rendered_pairs(tmp_path / "one.parquet", n=2)).to_pylist()[1]  # label_0 = 1
    flipped = {**row, "label_0": 0.0, "label_1": 1.0, "user_id": 2}
    data = tmp_path / "users.parquet"
    write_parquet([{**row, "user_id": 1}, flipped], data)
    table = write_table(tmp_path / "table.safetensors", [1, 2])
    common = (f"model.pretrained={tiny_model}", f"data.path={data}", "data.resolution=16", "train.batch_size=2",
              "data.cache=true", f"data.cache_dir={tmp_path / 'cache'}",
              "objective.beta=100", "train.learning_rate=1e-2", "train.max_steps=20")
    ppd = [r["loss"] for r in _run(tmp_path / "ppd", *common, "ppd.enabled=true", f"ppd.table={table}",
                                   "ppd.dropout=0")]
    blind = [r["loss"] for r in _run(tmp_path / "blind", *common, "lora.enabled=true", "lora.rank=4")]
    assert min(blind) >= math.log(2) - 1e-5 and max(blind) > math.log(2) + 1e-4, blind  # it moved, and cannot fit
    assert same_draws_every_step and ppd[0] == pytest.approx(math.log(2), abs=1e-5)
    assert ppd[-1] < 0.2 and max(ppd[1:]) < ppd[0], ppd  # measured 0.693 -> 0.043
