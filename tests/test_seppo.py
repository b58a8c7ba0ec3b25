"""SePPO: the flipper's loss against hand-computed numbers, the snapshot pool (draws, resume, autograd), configs."""
import json
import math
import os
import warnings

import pytest
import torch

from helpers import one_torch_thread, save_tiny_pipeline, thread_team  # noqa: F401
from t2i_align.config import ConfigError, ObjectiveConfig, load_config
from t2i_align.loop import train
from t2i_align.objectives.seppo import aaf_sign, seppo_loss
from t2i_align.references import draw_index
from helpers import logged_losses, loop_cfg, write_rendered_pairs

# Two samples, β = 10 (official: z = 5·margin). Sample 0: the policy beats the reference on the anchor
# (d = 0.6 - 0.5 = 0.1 > 0); sample 1 does not (d = 0.4 - 0.5 = -0.1).
MSE_W, REF_W = torch.tensor([0.5, 0.5]), torch.tensor([0.6, 0.4])
MSE_R, REF_R = torch.tensor([0.3, 0.3]), torch.tensor([0.2, 0.2])


@pytest.mark.parametrize("flip, signs, losses", [
    # s=+1: margin (0.6-0.2)-(0.5-0.3) = 0.2, z = 1, -log σ(1) = 0.3132617; s=-1: (0.4+0.2)-(0.5+0.3) = -0.2,
    # z = -1, -log σ(-1) = 1.3132617; s=0: 0.4-0.5 = -0.1, z = -0.5, -log σ(-0.5) = 0.9740770;
    # off, sample 1 with s=+1: (0.4-0.2)-(0.5-0.3) = 0, ln 2 = 0.6931472.
    ("sign", [1.0, -1.0], [0.3132617, 1.3132617]),
    ("indicator", [1.0, 0.0], [0.3132617, 0.9740770]),
    ("off", [1.0, 1.0], [0.3132617, 0.6931472]),
])
def test_seppo_loss_by_hand(flip, signs, losses):
    got, logits, s = seppo_loss(MSE_W, MSE_R, REF_W, REF_R, beta=10.0, flip=flip)
    assert s.tolist() == signs
    assert got.tolist() == pytest.approx(losses, abs=1e-6)
    assert logits[0].item() == pytest.approx(1.0, abs=1e-6)
    anchored, _, _ = seppo_loss(MSE_W, MSE_R, REF_W, REF_R, beta=10.0, flip=flip, sft_weight=2.0)
    assert anchored.tolist() == pytest.approx([x + 2.0 * 0.5 for x in losses], abs=1e-6)  # + λ·mse_w (0.5 each)


def test_the_flipper_reads_the_anchor_errors_when_given():
    # Averaged anchor errors (anchor_draws > 1) reverse both verdicts: sample 0 now loses on the anchor
    # (0.45 - 0.55 < 0), sample 1 wins (0.45 - 0.35 > 0); the loss terms still use this draw's errors.
    anchor = (torch.tensor([0.55, 0.35]), torch.tensor([0.45, 0.45]))
    got, _, s = seppo_loss(MSE_W, MSE_R, REF_W, REF_R, beta=10.0, flip="sign", anchor=anchor)
    assert s.tolist() == [-1.0, 1.0]
    # sample 0 with s=-1: (0.6+0.2)-(0.5+0.3) = 0, ln 2; sample 1 with s=+1: (0.4-0.2)-(0.5-0.3) = 0, ln 2
    assert got.tolist() == pytest.approx([0.6931472, 0.6931472], abs=1e-6)


def test_anchor_draws_average_the_flippers_errors_over_extra_no_grad_draws():
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from t2i_align import diffusion
    from t2i_align.objectives import ImageBatch
    from t2i_align.objectives.seppo import SePPO

    latents = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    images, scheduler, calls = ImageBatch(latents, embeds=None), DDPMScheduler(), []

    def zero_model(noisy, t, embeds, time_ids):  # predicts 0: its error is the mean squared ε
        calls.append(torch.is_grad_enabled())
        return torch.zeros_like(noisy)

    def anchor(draws, flip="sign", tie=False):
        objective = SePPO()
        objective.ctx = SimpleNamespace(cfg=SimpleNamespace(seppo=SimpleNamespace(anchor_draws=draws, flip=flip)),
                                        frozen=None)
        return objective.anchor_errors(zero_model, zero_model, images, scheduler, ObjectiveConfig(),
                                       torch.Generator().manual_seed(0), MSE_W, REF_W, tie)

    assert [a.tolist() for a in anchor(1)] == [MSE_W.tolist(), REF_W.tolist()] and calls == []
    got_policy, got_ref = anchor(3)
    assert calls == [False] * 4  # 2 extra draws × (policy, reference), no autograd
    g = torch.Generator().manual_seed(0)
    extra = []
    for _ in range(2):  # the same ε draws, by hand: error of a zero prediction = mean ε² per sample
        eps = diffusion.sample_noise(latents.shape, g, None, latents.dtype)
        diffusion.sample_timesteps(scheduler, 2, g, None)
        extra.append(eps.pow(2).mean(dim=(1, 2, 3)))
    assert got_policy.tolist() == pytest.approx(((MSE_W + extra[0] + extra[1]) / 3).tolist(), abs=1e-6)
    assert got_ref.tolist() == pytest.approx(((REF_W + extra[0] + extra[1]) / 3).tolist(), abs=1e-6)
    calls.clear()  # where s is not read (flip off, a tie step) the extra draws were UNet calls for nothing
    assert [a.tolist() for a in anchor(3, flip="off")] == [MSE_W.tolist(), REF_W.tolist()] and calls == []
    assert [a.tolist() for a in anchor(3, tie=True)] == [MSE_W.tolist(), REF_W.tolist()] and calls == []


def test_a_tie_means_the_reference_sample_is_not_a_loser():
    same = torch.tensor([0.5, 0.5])
    assert aaf_sign(same, same, "sign").tolist() == [-1.0, -1.0]  # d = 0 exactly: not better
    assert aaf_sign(same, same, "indicator").tolist() == [0.0, 0.0]
    # A whole-batch tie (the drawn snapshot is the policy) overrides rounding noise in d.
    assert aaf_sign(MSE_W, REF_W, "sign", tie=True).tolist() == [-1.0, -1.0]
    got, _, _ = seppo_loss(MSE_W, MSE_R, REF_W, REF_R, beta=10.0, flip="sign", tie=True)
    assert got[0].item() == pytest.approx(0.6931472, abs=1e-6)  # (0.6+0.2)-(0.5+0.3) = 0


def test_draws_depend_only_on_seed_and_step():
    import random

    import numpy as np

    draws = [draw_index("random", 5, seed=3, step=s) for s in range(200)]
    assert draws[:8] == [4, 4, 4, 1, 0, 0, 2, 2]  # numpy's default_rng([seed, step]).integers(5)
    random.seed(1), np.random.seed(1), torch.manual_seed(1)  # the global generators play no part
    assert [draw_index("random", 5, seed=4, step=s) for s in range(8)] == [3, 2, 1, 1, 1, 0, 1, 4]
    assert set(draws) == {0, 1, 2, 3, 4}  # uniform over the pool, the initial model (0) included
    assert draw_index("initial", 5, 3, 7) == 0 and draw_index("latest", 5, 3, 7) == 4


def test_the_reference_is_the_policy_only_when_drawn_at_the_policys_own_step():
    from t2i_align.references import SnapshotPool

    pool = SnapshotPool.__new__(SnapshotPool)  # the draw alone, without a model
    pool.draw, pool.seed, pool.steps, pool.current, pool.step = "latest", 0, [0, 2, 4], None, 0
    pool.snapshot_every, pool.last_applied = 0, 4
    assert not pool.reference_is_policy()  # nothing drawn yet
    pool.begin_step(4)
    assert pool.current == 4 and pool.reference_is_policy()  # the snapshot taken after the policy's 4 updates
    pool.after_step(5)
    pool.begin_step(5)
    assert pool.current == 4 and not pool.reference_is_policy()
    pool.after_step(6, applied=False)  # a step skipped for a non-finite gradient: the weights did not move
    pool.begin_step(6)
    assert pool.current == 4 and not pool.reference_is_policy()  # update 5 was applied after snapshot 4
    pool.steps = [0, 2, 5]
    pool.begin_step(6)
    assert pool.current == 5 and pool.reference_is_policy()  # snapshot 5 = the weights after the skipped step 6
    pool.last_applied = None  # resumed from a checkpoint that did not record it: only this very step
    assert not pool.reference_is_policy()


def _recorded_visits(monkeypatch) -> list:
    """The modules seppo's `visiting` holds on the device at each moment (a stand-in that moves nothing)."""
    from contextlib import contextmanager

    import t2i_align.objectives.seppo as seppo_module

    visits = []

    @contextmanager
    def visiting(module, device):
        visits.append(module)
        yield module
        visits.remove(module)
    monkeypatch.setattr(seppo_module, "visiting", visiting)
    return visits


@pytest.mark.parametrize("tie, offloaded", [(False, False), (True, True)])
def test_seppo_compute_loss_by_hand(tie, offloaded, monkeypatch):
    """SePPO.compute_loss with a stand-in reference sampler: the preferred latents are 0 and the policy predicts
    ε exactly on them (ε = x_t / σ_t), the reference predicts 0; the reference's samples are all 1. With ᾱ =
    [0.64, 0.36]: mse_w = 0, mse_r = ᾱ_t / (1 - ᾱ_t) = SNR(t) (16/9 at t = 0, 0.5625 at t = 1), and the reference
    errs equally on both (the noise is shared). Without a tie the policy beats the reference on the anchor (s = +1):
    loss_i = softplus(-5·SNR(t_i)); with a tie (the drawn snapshot is the policy) s = -1:
    loss_i = softplus(-5·(2·mean ε_i² - SNR(t_i))). An offloaded frozen copy is brought over once for the whole
    sample (per call, every DDIM step moved the whole UNet both ways)."""
    from types import SimpleNamespace

    from diffusers import DDPMScheduler

    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.objectives import ImageBatch
    from t2i_align.objectives.seppo import SePPO

    sched = DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375])  # ᾱ = [0.64, 0.36]
    sigma, calls = (1 - sched.alphas_cumprod).sqrt(), []

    def policy(noisy, t, embeds, time_ids=None):
        calls.append((noisy.clone(), t.clone()))
        return noisy / sigma[t].reshape(-1, 1, 1, 1)

    def reference(noisy, *rest):
        return torch.zeros_like(noisy)

    def sample(ref, embeds, latent_shape, **kw):  # the reference's samples, at SePPO's steps and guidance
        sampled.append((ref, embeds, kw["steps"], kw["guidance"]))
        assert visits == ([frozen] if offloaded else [])  # there for all its steps
        return torch.ones(4, *latent_shape)

    frozen, visits = torch.nn.Linear(1, 1) if offloaded else None, _recorded_visits(monkeypatch)

    objective, sampled = SePPO(), []
    seppo = SimpleNamespace(anchor_draws=1, flip="sign", sample_steps=7, guidance_scale=2.5, reencode=False)
    objective.ctx = SimpleNamespace(cfg=SimpleNamespace(seppo=seppo),
                                    components=SimpleNamespace(spec=SimpleNamespace(uses_time_ids=False)),
                                    sample=sample, frozen=frozen)
    objective.pool = SimpleNamespace(reference_is_policy=lambda: tie)
    images = ImageBatch(torch.zeros(4, 1, 2, 2), PromptEmbeds(torch.zeros(4, 5, 8)))
    loss, metrics = objective.compute_loss(policy, reference, images, sched,
                                           ObjectiveConfig(name="seppo", beta=10.0), torch.Generator().manual_seed(0))
    (noisy, t), = calls
    (ref, embeds, steps, guidance), = sampled
    assert ref is reference and embeds is images.embeds and (steps, guidance) == (7, 2.5)
    assert t.tolist() == [0, 0, 0, 1, 0, 0, 0, 1]  # one draw of t per pair of rows (seed 0)
    snr = torch.tensor([16 / 9, 16 / 9, 16 / 9, 0.5625])
    assert metrics["mse_w"] == pytest.approx(0.0, abs=1e-10)
    assert metrics["mse_ref_sample"] == pytest.approx(snr.mean().item(), rel=1e-5)
    assert metrics["flip_rate"] == (1.0 if tie else 0.0)
    if not tie:  # softplus(-80/9) = 1.3790e-4 (three times), softplus(-2.8125) = 0.058320
        assert loss.item() == pytest.approx(0.0146835, rel=1e-4)
    else:
        eps2 = (noisy[:4] / sigma[t[:4]].reshape(-1, 1, 1, 1)).pow(2).mean(dim=(1, 2, 3))
        assert loss.item() == pytest.approx(torch.nn.functional.softplus(-5 * (2 * eps2 - snr)).mean().item(),
                                            rel=1e-5)


@pytest.mark.parametrize("reencode", [True, False])
def test_reencode_trains_on_the_vae_encoding_of_the_decoded_reference_sample(reencode):
    """seppo.reencode (on in every SePPO config): the reference's sample (all 3) is decoded, clamped to [-1, 1] and
    encoded again (generated latents lie off the encoder's); off, the sample itself is the loser."""
    from types import SimpleNamespace

    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.objectives import ImageBatch
    from t2i_align.objectives.seppo import SePPO

    seen = []

    def decode(latents):  # pixels = 0.5 · latents: 1.5, clamped to 1
        seen.append(("decode", latents.clone()))
        return 0.5 * latents

    def encode(pixels):  # latents = 10 · pixels + 2: 12
        seen.append(("encode", pixels.clone()))
        return 10 * pixels + 2

    objective = SePPO()
    seppo = SimpleNamespace(sample_steps=3, guidance_scale=1.0, reencode=reencode)
    objective.ctx = SimpleNamespace(cfg=SimpleNamespace(seppo=seppo), frozen=None,
                                    components=SimpleNamespace(spec=SimpleNamespace(uses_time_ids=False)),
                                    sample=lambda ref, embeds, latent_shape, **kw: torch.full((2, *latent_shape), 3.0),
                                    decode_latents=decode, encode_images=encode)
    images = ImageBatch(torch.zeros(2, 1, 2, 2, dtype=torch.float64), PromptEmbeds(torch.zeros(2, 5, 8)))
    sample, time_ids = objective.reference_samples(lambda *a: None, images)
    assert time_ids is None and sample.dtype == torch.float64  # the preferred latents' dtype
    if reencode:
        assert [name for name, _ in seen] == ["decode", "encode"] and bool((seen[1][1] == 1).all())
        assert bool((sample == 12).all())
    else:
        assert not seen and bool((sample == 3).all())


@pytest.mark.parametrize("override", ["seppo.pool_size=0", "seppo.reference=best", "seppo.flip=maybe",
                                      "seppo.snapshot_every=0", "seppo.anchor_draws=0"])
def test_bad_seppo_settings_fail_at_config_load(override):
    with pytest.raises(ConfigError, match=override.split("=")[0].split(".")[1]):
        load_config(None, [override])


def test_a_lora_snapshot_as_reference_leaves_the_policy_gradients_alone(tmp_path):
    from t2i_align.batches import make_denoiser
    from t2i_align.config import LoraConfig
    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.adapters import trainable_parameters
    from t2i_align.models import load_components
    from t2i_align.config import ModelConfig
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    params = trainable_parameters(comp.unet, LoraConfig(enabled=True, rank=2, init="default"))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    pool = SnapshotPool(comp.unet, comp, True, None, snapshot_every=1, pool_size=3, draw="latest", seed=0,
                        output_dir=tmp_path / "run")
    policy = make_denoiser(comp.unet, comp)
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), PromptEmbeds(torch.randn(2, 77, 32))
    comp.unet.eval()
    with torch.no_grad():
        snapshotted = policy(x, t, emb)  # the adapters as the snapshot took them
        for p in params:  # the live adapters move on; the snapshot keeps the old values
            p.mul_(1.5)
    pool.begin_step(1)
    reference = pool.denoiser()
    with torch.no_grad():
        assert torch.allclose(reference(x, t, emb), snapshotted, atol=1e-6)  # (zeroed adapters: the base model)

    def grads(with_reference):
        comp.unet.zero_grad()
        out = policy(x, t, emb)
        if with_reference:
            ref_out = reference(x, t, emb)
            assert not torch.allclose(ref_out, out.detach())  # the snapshot really is another model
        out.square().mean().backward()
        return [p.grad.clone() for p in params]

    comp.unet.train()  # as in a run (loaded in eval mode): the snapshot's eval mode must not stay
    plain, mixed = grads(False), grads(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, mixed))
    assert all(p.requires_grad for p in params) and comp.unet.training is True  # mode restored as found


@pytest.mark.parametrize("in_memory, reads", [(False, 5), (True, 3)])
def test_full_finetune_snapshots_are_read_once_when_kept_in_memory(tmp_path, monkeypatch, in_memory, reads):
    """seppo.snapshots_in_memory: each snapshot file is read once and kept; without it, each change of the draw
    reads a file. Either way the frozen copy holds the drawn snapshot; one that leaves the pool leaves RAM too."""
    import safetensors.torch

    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    frozen = frozen_reference(comp.unet, torch.float32)
    pool = SnapshotPool(comp.unet, comp, False, frozen, snapshot_every=1, pool_size=2, draw="random", seed=0,
                        output_dir=tmp_path / "run", in_memory=in_memory)
    weight = next(comp.unet.parameters())
    with torch.no_grad():
        weight.add_(1.0)  # the policy moves on: snapshot 1 differs from snapshot 0
    pool.after_step(1)
    read, real = [], safetensors.torch.load_file
    monkeypatch.setattr(safetensors.torch, "load_file", lambda path: read.append(path) or real(path))
    for step in (0, 1, 0, 1):
        pool._load_full(step)
        assert torch.allclose(next(frozen.parameters()), weight.detach() - (1.0 if step == 0 else 0.0), atol=1e-6)
    with torch.no_grad():
        weight.add_(1.0)
    pool.after_step(2)  # the pool holds 2: snapshot 1 leaves, and RAM with it
    pool._load_full(2)
    assert len(read) == reads and sorted(pool.ram) == ([0, 2] if in_memory else [])
    with torch.no_grad():  # a file of step 3 left by an abandoned run (resumed from an earlier checkpoint)
        weight.add_(1.0)
    safetensors.torch.save_file({"stale": torch.zeros(1)}, str(pool._file(3)))
    pool.after_step(3)
    assert torch.equal(real(str(pool._file(3)))[next(iter(comp.unet.state_dict()))], weight.detach())


def test_a_snapshot_the_main_process_cannot_write_stops_every_process(tmp_path):
    """A full fine-tune snapshot that fails on the main process (here its folder is a file; a full disk alike)
    raises there with its own error and on the other processes with its text, instead of leaving them waiting
    in their next collective until the run's timeout. Two threads stand in for the processes."""
    from concurrent.futures import ThreadPoolExecutor

    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.errors import UserError
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    frozen = frozen_reference(comp.unet, torch.float32)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "reference_pool").write_text("not a folder")

    def process(rank, team):
        try:
            SnapshotPool(comp.unet, comp, False, frozen, snapshot_every=1, pool_size=2, draw="random", seed=0,
                         output_dir=tmp_path / "run", is_main=rank == 0, share=team.share)
        except Exception as err:
            return err

    with ThreadPoolExecutor(2) as threads:
        main, other = threads.map(process, range(2), thread_team(2))
    assert isinstance(main, FileExistsError)  # the main process keeps its own exception and traceback
    assert isinstance(other, UserError) and "could not write SePPO's reference snapshot" in str(other)
    assert str(tmp_path / "run" / "reference_pool") in str(other)


def test_a_set_aside_checkpoint_keeps_its_snapshots_up_to_the_step_resumed_from(tmp_path):
    """A checkpoint abandoned by a resume from step 1 lists snapshots 0-2; its step-2 file went aside with it, so a
    step-2 file here is the resumed run's and leaves with the pool, while step 1 stays for the abandoned one."""
    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    aside = tmp_path / "run" / "checkpoints" / "abandoned-20261201-000000-from-step-1" / "step-2"
    aside.mkdir(parents=True)
    (aside / "reference_pool.json").write_text(json.dumps({"steps": [0, 1, 2]}))
    # a save stopped inside save_extra (a full disk) left a torn listing in its hidden temp folder: it blocked every
    # start and resume (JSONDecodeError), and a whole one kept its snapshots alive; it is no checkpoint
    torn = tmp_path / "run" / "checkpoints" / ".step-9.tmp"
    torn.mkdir()
    (torn / "reference_pool.json").write_text('{"steps": [0, 1, 2, 3')
    pool = SnapshotPool(comp.unet, comp, False, frozen_reference(comp.unet, torch.float32), snapshot_every=1,
                        pool_size=2, draw="random", seed=0, output_dir=tmp_path / "run")
    for step in (1, 2, 3):  # the pool holds [0, 3] at the end
        pool.after_step(step)
    assert sorted(p.name for p in pool.pool_dir.iterdir()) == [f"step-{s}.safetensors" for s in (0, 1, 3)]


def test_a_pool_of_one_takes_no_snapshot_after_the_initial_one(tmp_path, monkeypatch):
    """pool_size 1 keeps the initial model alone: each snapshot was gathered, written and deleted at once."""
    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    written = []
    original = SnapshotPool._write_full
    monkeypatch.setattr(SnapshotPool, "_write_full", lambda self, step: written.append(step) or original(self, step))
    pool = SnapshotPool(comp.unet, comp, False, frozen_reference(comp.unet, torch.float32), snapshot_every=1,
                        pool_size=1, draw="random", seed=0, output_dir=tmp_path / "run")
    for step in (1, 2, 3):
        pool.after_step(step)
    assert written == [0] and pool.steps == [0]
    assert [p.name for p in pool.pool_dir.iterdir()] == ["step-0.safetensors"]


def test_a_snapshot_is_fsynced_and_a_failed_one_leaves_no_file(tmp_path, monkeypatch):
    """The checkpoint listing a snapshot is marked complete right after it is written: unsynced, a host crash could
    leave it empty; a failed write (a full disk) left a UNet-sized step-N.tmp that nothing removed."""
    import os

    import safetensors.torch

    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    synced, real_fsync = [], os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")) or real_fsync(fd))
    pool = SnapshotPool(comp.unet, comp, False, frozen_reference(comp.unet, torch.float32), snapshot_every=1,
                        pool_size=3, draw="random", seed=0, output_dir=tmp_path / "run")
    assert str(pool.pool_dir) in synced and any(".step-0.safetensors." in name for name in synced)
    real_save = safetensors.torch.save_file

    def full_disk(tensors, path, metadata=None):
        real_save(tensors, path, metadata=metadata)
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left"):
        pool.after_step(1)
    assert [p.name for p in pool.pool_dir.iterdir()] == ["step-0.safetensors"]


def test_the_pool_keeps_only_what_its_draw_uses_and_pruned_checkpoints_free_their_files(tmp_path):
    """`initial` and `latest` took (a UNet-sized write each, a gather under FSDP) snapshots no draw could use; the
    files of checkpoints pruned after the last snapshot stayed for good."""
    import shutil

    from t2i_align.adapters import frozen_reference
    from t2i_align.config import ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    frozen = frozen_reference(comp.unet, torch.float32)
    for draw, kept in (("initial", [0]), ("latest", [0, 3]), ("random", [0, 2, 3])):
        out = tmp_path / draw
        pool = SnapshotPool(comp.unet, comp, False, frozen, snapshot_every=1, pool_size=3, draw=draw, seed=0,
                            output_dir=out)
        for step in (1, 2, 3):
            pool.after_step(step)
        assert pool.steps == kept
        assert sorted(p.name for p in pool.pool_dir.iterdir()) == sorted(f"step-{s}.safetensors" for s in kept)
    checkpoint = out / "checkpoints" / "step-3"
    checkpoint.mkdir(parents=True)
    pool.save(checkpoint)  # lists 0, 2, 3
    pool.after_step(4)
    pool.after_step(5)  # 2 and 3 left the pool; the checkpoint keeps their files
    (pool.pool_dir / ".step-6.safetensors.x1").write_text("a killed write's")
    assert sorted(p.name for p in pool.pool_dir.iterdir())[1:] == [f"step-{s}.safetensors" for s in (0, 2, 3, 4, 5)]
    archive = tmp_path / "archive" / "step-3"
    shutil.copytree(checkpoint, archive, copy_function=os.link)  # archived (as cp -al); the pruning follows
    shutil.rmtree(checkpoint)  # pruned by the next checkpoint
    pool.after_checkpoint()
    assert sorted(p.name for p in pool.pool_dir.iterdir()) == [f"step-{s}.safetensors" for s in (0, 4, 5)]
    # the archived checkpoint holds its snapshots (links): a resume from it finds them (it failed: "missing")
    from t2i_align.snapshots import restore_snapshots

    restore_snapshots(archive, out)
    again = SnapshotPool(comp.unet, comp, False, frozen, snapshot_every=1, pool_size=3, draw="random", seed=0,
                         output_dir=out, resume_from=archive)
    again.load(archive)
    assert again.steps == [0, 2, 3] and all(again._file(s).is_file() for s in again.steps)


def test_settings_that_never_draw_a_later_snapshot_are_warned():
    from t2i_align.config import load_config

    base = ["objective.name=seppo", "train.max_steps=100"]
    for extra, why in ((["seppo.pool_size=1"], "seppo.pool_size is 1"),
                       (["seppo.snapshot_every=100"], r"seppo.snapshot_every \(100\) >= train.max_steps \(100\)")):
        with pytest.warns(UserWarning, match=why + ": SePPO's reference is the initial model at every step"):
            load_config(None, base + extra)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, base + ["seppo.snapshot_every=99"])
        load_config(None, base + ["seppo.reference=initial"])


SEPPO = ("objective.name=seppo", "objective.beta=100", "train.log_every=1", "train.checkpoint_every=2",
         "seppo.snapshot_every=1", "seppo.pool_size=3", "seppo.sample_steps=2", "seppo.guidance_scale=2.0")


@pytest.mark.parametrize("lora", ["true", "false"])
def test_seppo_resume_continues_with_the_same_pool(tiny_model, pairs, tmp_path, lora):
    full, part = tmp_path / "full", tmp_path / "part"
    train(loop_cfg(tiny_model, pairs, full, *SEPPO, f"lora.enabled={lora}", "train.max_steps=4"))
    train(loop_cfg(tiny_model, pairs, part, *SEPPO, f"lora.enabled={lora}", "train.max_steps=2"))
    pool = json.loads((part / "checkpoints" / "step-2" / "reference_pool.json").read_text())
    assert pool == {"steps": [0, 1, 2], "last_applied": 2}
    train(loop_cfg(tiny_model, pairs, part, *SEPPO, f"lora.enabled={lora}", "train.max_steps=4",
               "train.resume=latest"))
    records = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    resumed = [json.loads(line) for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert [r["reference_step"] for r in resumed] == [r["reference_step"] for r in records]
    assert logged_losses(part) == pytest.approx(logged_losses(full), abs=1e-6)
    assert records[0]["flip_rate"] == 1.0  # step 0: the reference is the policy, a tie for every sample
    assert records[-1]["reference_pool_size"] == 3  # the initial model and the two newest snapshots
    if lora == "true":
        return
    # resumed again from step 2, abandoning step 4: the snapshots only the abandoned checkpoint lists (steps 3, 4)
    # go aside with it, untouched, while this run writes its own under those names and takes the same steps again
    pool = part / "reference_pool"
    abandoned = {name: (pool / name).read_bytes() for name in ("step-3.safetensors", "step-4.safetensors")}
    train(loop_cfg(tiny_model, pairs, part, *SEPPO, "lora.enabled=false", "train.max_steps=4",
               f"train.resume={part / 'checkpoints' / 'step-2'}"))
    aside = next((part / "checkpoints").glob("abandoned-*"))
    assert sorted(p.name for p in aside.iterdir()) == ["final", "gallery", "metrics.jsonl", "reference_pool",
                                                       "step-4"]
    kept = {p.name: p.read_bytes() for p in (aside / "reference_pool").iterdir()}
    assert {name: kept[name] for name in abandoned} == abandoned
    assert json.loads((aside / "step-4" / "reference_pool.json").read_text())["steps"] == [0, 3, 4]
    assert {"step-0.safetensors", *abandoned} <= {p.name for p in pool.iterdir()}  # this run's own
    assert logged_losses(part)[-2:] == pytest.approx(logged_losses(full)[-2:], abs=1e-6)
    # the abandoned folder is self-contained: its step 0 snapshot is linked there, so it resumes elsewhere (without
    # it the resume stopped on "reference snapshots ... are missing")
    linked = (aside / "reference_pool" / "step-0.safetensors").stat().st_ino
    assert linked == (pool / "step-0.safetensors").stat().st_ino
    train(loop_cfg(tiny_model, pairs, tmp_path / "again", *SEPPO, "lora.enabled=false", "train.max_steps=5",
               f"train.resume={aside / 'step-4'}"))
    assert [json.loads(line)["step"] for line in (tmp_path / "again" / "metrics.jsonl").read_text().splitlines()] \
        == [1, 2, 3, 4, 5]


def test_seppo_full_finetune_resumes_from_a_checkpoint_set_aside(tiny_model, pairs, tmp_path):
    """The set-aside log says `train.resume=<output_dir>/previous-*/step-N` continues the earlier run; for a full
    fine-tune that needs the earlier run's snapshots, which went aside with it: the resume copies them back (it
    stopped on "reference snapshots ... are missing")."""
    full, out = tmp_path / "full", tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, full, *SEPPO, "lora.enabled=false", "train.max_steps=4"))
    train(loop_cfg(tiny_model, pairs, out, *SEPPO, "lora.enabled=false", "train.max_steps=2"))
    train(loop_cfg(tiny_model, pairs, out, *SEPPO, "lora.enabled=false", "train.max_steps=1",
               "train.checkpoint_every=0"))  # a fresh start: the first run goes aside
    (aside,) = out.glob("previous-*")
    train(loop_cfg(tiny_model, pairs, out, *SEPPO, "lora.enabled=false", "train.max_steps=4",
               f"train.resume={aside / 'step-2'}"))
    assert logged_losses(out) == pytest.approx(logged_losses(full), abs=1e-6)  # steps 1-2 carried over, 3-4 taken again
    assert len(list(out.glob("previous-*"))) == 2  # the one-step run went aside in turn


def test_flipper_agreement_counts_by_hand():
    import numpy as np

    from t2i_align.toy.flipper import summarize

    anchor, sample = np.array([1.0, 0.6, 0.8, 0.4]), np.array([0.6, 0.8, 0.8, 0.2])  # judge: loser T F F T
    one, mean = np.array([True, True, False, False]), np.array([True, False, False, True])
    got = summarize(anchor, sample, one, mean)
    assert got["judge_says_loser"] == 0.5 and got["flipper_says_loser_one_draw"] == 0.5
    assert got["agreement_one_draw"] == 0.5 and got["agreement_mean_draws"] == 1.0  # a tie (0.8, 0.8) is no loser


def test_seppo_step_on_tiny_sdxl_with_generated_time_ids(tmp_path, monkeypatch):
    """The reference's samples are conditioned as generated (uncropped, at the training size: [16, 16, 0, 0, 16,
    16]), the preferred images as read (data.time_ids=per_image: the 24 px render's size before the resize)."""
    from t2i_align.objectives.seppo import SePPO

    seen, original = [], SePPO.compute_loss

    def policy_inputs(self, policy, reference, batch, *args, **kw):
        def recorded(noisy, t, embeds, time_ids=None):
            seen.append(time_ids)
            return policy(noisy, t, embeds, time_ids)
        return original(self, recorded, reference, batch, *args, **kw)

    monkeypatch.setattr(SePPO, "compute_loss", policy_inputs)
    model = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=4, size=24)
    out = tmp_path / "run"
    train(loop_cfg(model, data, out, *SEPPO, "lora.enabled=true", "train.max_steps=2", "model.weight_dtype=fp32",
               "data.time_ids=per_image"))
    assert len(seen) == 2 and all(ids.tolist() == [[24, 24, 0, 0, 16, 16]] * 2 + [[16, 16, 0, 0, 16, 16]] * 2
                                  for ids in seen)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(math.isfinite(r["loss"]) for r in records)
    assert records[1]["reference_pool_size"] == 2


def test_flipper_check_repeats_and_leaves_the_global_rng_alone(tmp_path, monkeypatch):
    """The tool seeded torch's global RNG (a caller's later draws changed) and drew its anchor noise from a stream
    seeded like its starting latents; now two streams of its own: the same numbers twice, the global RNG untouched,
    the anchor draws' noise not the starts'."""
    import t2i_align.toy.flipper as flipper

    seen = {}
    for name in ("initial_latents", "anchor_error_draws"):  # the first value each stream gives, as it is used
        def first_draw(*args, _name=name, _real=getattr(flipper, name)):
            gen = next(a for a in args if isinstance(a, torch.Generator))
            seen.setdefault(_name, torch.randn(4, generator=torch.Generator().set_state(gen.get_state())))
            return _real(*args)
        monkeypatch.setattr(flipper, name, first_draw)
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=3)
    state = torch.get_rng_state()
    first = flipper.check(None, str(data), n=3, steps=2, draws=2, batch=2)
    assert torch.equal(torch.get_rng_state(), state)
    assert flipper.check(None, str(data), n=3, steps=2, draws=2, batch=2) == first and first["n"] == 3
    assert not torch.equal(seen["initial_latents"], seen["anchor_error_draws"])


def test_a_lora_snapshot_reference_runs_without_dropout(tmp_path):
    """The reference is a fixed model: with LoRA dropout, the snapshot's forward in train mode would draw a new
    dropout mask per call (no test had dropout on: `unet.eval()` removed passed every SePPO test)."""
    from t2i_align.adapters import trainable_parameters
    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.config import LoraConfig, ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import SnapshotPool

    comp = load_components(ModelConfig(pretrained=str(save_tiny_pipeline("sd15", tmp_path / "m"))))
    params = trainable_parameters(comp.unet, LoraConfig(enabled=True, rank=2, init="default", dropout=0.5))
    with torch.no_grad():
        for p in params:
            p.add_(0.05 * torch.randn_like(p))
    pool = SnapshotPool(comp.unet, comp, True, None, snapshot_every=1, pool_size=3, draw="latest", seed=0,
                        output_dir=tmp_path / "run")
    pool.begin_step(1)
    reference = pool.denoiser()
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), PromptEmbeds(torch.randn(2, 77, 32))
    comp.unet.train()
    first, second = reference(x, t, emb), reference(x, t, emb)
    comp.unet.eval()
    assert torch.equal(first, second) and torch.equal(first, reference(x, t, emb))


def test_the_lora_base_reference_runs_in_eval_mode(tmp_path):
    """The base reference of a LoRA run is the live UNet with adapters off, which the loop keeps in train mode: a
    UNet with dropout > 0 drew a new mask per call, a noisy reference (the official code's is a frozen eval copy)."""
    import json

    from t2i_align.adapters import trainable_parameters
    from t2i_align.conditioning.text import PromptEmbeds
    from t2i_align.config import LoraConfig, ModelConfig
    from t2i_align.models import load_components
    from t2i_align.references import BaseReference

    folder = save_tiny_pipeline("sd15", tmp_path / "m")
    config = json.loads((folder / "unet" / "config.json").read_text())
    (folder / "unet" / "config.json").write_text(json.dumps({**config, "dropout": 0.5}))
    comp = load_components(ModelConfig(pretrained=str(folder)))
    with torch.no_grad():  # adapters that change the output, with their own dropout
        for param in trainable_parameters(comp.unet, LoraConfig(enabled=True, rank=2, dropout=0.5)):
            param.add_(0.05)
    reference = BaseReference(comp.unet, comp, True, None).denoiser()
    x, t, emb = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), PromptEmbeds(torch.randn(2, 77, 32))
    comp.unet.train()
    with torch.no_grad():
        first, second = reference(x, t, emb), reference(x, t, emb)
    assert torch.equal(first, second) and comp.unet.training  # train mode given back
    assert all(m.training for m in comp.unet.modules()), "every module's mode given back"
    comp.unet.eval()  # what the switch must equal: the whole UNet in eval mode, diffusers' own adapter switch
    comp.unet.disable_adapters()
    with torch.no_grad():
        torch.testing.assert_close(first, comp.unet(x, t, emb.prompt_embeds).sample, atol=0, rtol=0)


@pytest.mark.parametrize("family,cache", [("sd15", "true"), ("sdxl", "false")])
def test_rows_blanked_by_prompt_dropout_sample_their_reference_image_for_their_caption(tmp_path, monkeypatch,
                                                                                       family, cache):
    """x^r is the reference's image for the preferred image's prompt: a row data.prompt_dropout blanked is trained
    unconditional, but its x^r was sampled from "" too (on SDXL with guidance between "" and zeros). The same
    rows in the same order with and without dropout: the sampling conditioning must not differ."""
    import t2i_align.objectives.seppo as seppo

    calls, original = [], seppo.sampling_embeds

    def recorded(components, images):
        out = original(components, images)
        calls.append((images.embeds.prompt_embeds.clone(), out.prompt_embeds.clone(),
                      None if out.pooled_prompt_embeds is None else out.pooled_prompt_embeds.clone()))
        return out

    monkeypatch.setattr(seppo, "sampling_embeds", recorded)
    model = save_tiny_pipeline(family, tmp_path / family)
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=4)
    for dropout in (0.5, 0.0):
        train(loop_cfg(model, data, tmp_path / f"run{dropout}", *SEPPO, "lora.enabled=true", "train.max_steps=4",
                   f"data.prompt_dropout={dropout}", f"data.cache={cache}",
                   f"data.cache_dir={tmp_path / 'cache'}", "model.weight_dtype=fp32"))
    dropped, kept = calls[:4], calls[4:]
    assert len(kept) == 4
    blanked = [not torch.equal(d[0][i], k[0][i]) for d, k in zip(dropped, kept) for i in range(2)]
    assert 0 < sum(blanked) < 8  # some rows were trained unconditional, some not
    for (_, sample_d, pooled_d), (train_k, sample_k, pooled_k) in zip(dropped, kept):
        assert torch.equal(sample_k, train_k)  # no dropout: x^r sampled with the training conditioning
        assert torch.allclose(sample_d, sample_k, atol=1e-6)
        if family == "sdxl":
            assert torch.allclose(pooled_d, pooled_k, atol=1e-6)


def test_seppo_resume_checks_fit_the_pool_to_the_settings_and_refuse_what_it_cannot_use(tiny_model, pairs, tmp_path):
    """A pool resumed with a smaller seppo.pool_size kept (and drew from) every saved snapshot; a DPO checkpoint
    resumed as SePPO failed after the model load, config.yaml already rewritten; too many sampling steps failed in
    DDIM at the first step (a traceback); a damaged LoRA pool made the reference the live policy silently."""
    from safetensors.torch import load_file, save_file

    from t2i_align.checkpoints import CheckpointMismatch

    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *SEPPO, "lora.enabled=true", "train.max_steps=2"))
    step2 = out / "checkpoints" / "step-2"
    assert json.loads((step2 / "reference_pool.json").read_text())["steps"] == [0, 1, 2]
    train(loop_cfg(tiny_model, pairs, out, *SEPPO, "lora.enabled=true", "train.max_steps=3", "train.resume=latest",
               "seppo.pool_size=2"))
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["reference_pool_size"] == 2
    tensors = load_file(str(step2 / "reference_pool.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("1/")}, str(step2 / "reference_pool.safetensors"))
    with pytest.raises(CheckpointMismatch, match="the snapshot of step 1 does not fit this run's adapters"):
        train(loop_cfg(tiny_model, pairs, tmp_path / "damaged", *SEPPO, "lora.enabled=true", "train.max_steps=3",
                   f"train.resume={step2}"))
    dpo = tmp_path / "dpo"
    train(loop_cfg(tiny_model, pairs, dpo, "lora.enabled=true", "train.max_steps=1", "train.checkpoint_every=1"))
    with pytest.raises(CheckpointMismatch, match="holds no SePPO reference pool .*written by objective 'dpo'"):
        train(loop_cfg(tiny_model, pairs, dpo, *SEPPO, "lora.enabled=true", "train.max_steps=3", "train.resume=latest"))
    assert "name: dpo" in (dpo / "config.yaml").read_text()  # refused before the run claimed its folder
    with pytest.raises(ConfigError, match="seppo.sample_steps=2000 is more DDIM steps than this model's schedule"):
        train(loop_cfg(tiny_model, pairs, tmp_path / "steps", *SEPPO, "seppo.sample_steps=2000", "train.max_steps=1"))
    with pytest.warns(UserWarning, match="seppo.snapshots_in_memory is set on the command line, but only a full"):
        loop_cfg(tiny_model, pairs, tmp_path / "x", *SEPPO, "lora.enabled=true", "seppo.snapshots_in_memory=true")


def test_a_step_at_learning_rate_zero_does_not_count_as_applied(tiny_model, pairs, tmp_path):
    """Warmup's first step has rate 0 and leaves the weights as they were, yet counted as applied: at the next step
    snapshot 0, the policy itself, was not treated as a tie (s read from rounding noise)."""
    out = tmp_path / "run"
    train(loop_cfg(tiny_model, pairs, out, *[s for s in SEPPO if "checkpoint_every" not in s], "lora.enabled=true",
               "train.lr_warmup_steps=3", "train.max_steps=2", "train.checkpoint_every=1"))
    applied = [json.loads((out / "checkpoints" / f"step-{s}" / "reference_pool.json").read_text())["last_applied"]
               for s in (1, 2)]
    assert applied == [0, 2]  # step 1 at rate 0; step 2 (a third of the peak rate) changed the weights
