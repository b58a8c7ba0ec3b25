"""Objectives: hand-computed DPO losses, batching invariants, the ln 2 start, SDXL inputs and the registry."""
from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler

from t2i_align import adapters, diffusion
from t2i_align.conditioning.text import PromptEmbeds, text_time_added_cond
from t2i_align.config import LoraConfig, ObjectiveConfig
from t2i_align.objectives import DPO, SFT, ImageBatch, PairBatch, dpo_loss, get_objective
from t2i_align.objectives.dpo import implicit_accuracy

from helpers import one_torch_thread, tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: F401 (autouse fixture)

MW, ML = torch.tensor([0.10, 0.30]), torch.tensor([0.20, 0.10])
RW, RL = torch.tensor([0.15, 0.20]), torch.tensor([0.15, 0.20])


def nice_scheduler() -> DDPMScheduler:
    """ᾱ = [0.64, 0.36]: sqrt(1 - ᾱ_t) = 0.6 at t = 0 and 0.8 at t = 1."""
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375])


def pair_batch(b=2, seed=0, c=4, size=4, time_ids=False):
    g = torch.Generator().manual_seed(seed)
    embeds = PromptEmbeds(torch.randn(b, 5, 32, generator=g), torch.randn(b, 32, generator=g) if time_ids else None)
    tids = [torch.randn(b, 6, generator=g) for _ in range(2)] if time_ids else [None, None]
    return PairBatch(torch.randn(b, c, size, size, generator=g), torch.randn(b, c, size, size, generator=g), embeds,
                     *tids)


class Recorder:
    """A fake denoiser: records its inputs and returns `fn(noisy, t)` (zeros without `fn`)."""

    def __init__(self, fn=lambda noisy, t: torch.zeros_like(noisy)):
        self.fn, self.calls = fn, []

    def __call__(self, noisy, t, embeds, time_ids=None):
        self.calls.append((noisy.clone(), t.clone(), embeds, time_ids))
        return self.fn(noisy, t)


def test_dpo_sigmoid_by_hand():
    losses, logits = dpo_loss(MW, ML, RW, RL, beta=10.0)
    # z = -½·10·((0.1-0.2) - 0) = 0.5 ; -5·((0.3-0.1) - 0) = -1.0
    assert torch.allclose(logits, torch.tensor([0.5, -1.0]), atol=1e-6)
    # -log σ(0.5) = log(1 + e^-0.5) ; -log σ(-1) = log(1 + e)
    assert torch.allclose(losses, torch.tensor([0.474077, 1.313262]), atol=1e-6)
    # the mean of the pairs' losses; not the diffusers#6702 bug, the loss of the mean logit: -log σ(-0.25) = 0.825939
    assert losses.mean().item() == pytest.approx(0.893670, abs=1e-6)
    assert implicit_accuracy(torch.tensor([1.0, -2.0, 0.0, 3.0])).item() == pytest.approx(0.625)  # (2 + ½) / 4
    diffusers_losses, diffusers_logits = dpo_loss(MW, ML, RW, RL, beta=5.0, beta_convention="diffusers")
    assert torch.allclose(diffusers_logits, logits) and torch.allclose(diffusers_losses, losses)


def test_dpo_hinge_and_ipo_by_hand():
    hinge, _ = dpo_loss(MW, ML, RW, RL, beta=10.0, loss_type="hinge")
    assert torch.allclose(hinge, torch.tensor([0.5, 2.0]), atol=1e-6)  # relu(1 - 0.5), relu(1 + 1)
    # ipo: margin h = [0.1, -0.2], scale s = 5, target 1/(2s) = 0.1 -> (0)², (-0.3)²
    ipo, _ = dpo_loss(MW, ML, RW, RL, beta=10.0, loss_type="ipo")
    assert torch.allclose(ipo, torch.tensor([0.0, 0.09]), atol=1e-6)
    for loss_type in ("hinge", "ipo"):  # official β = 2 × diffusers β in every loss
        official, _ = dpo_loss(MW, ML, RW, RL, beta=10.0, loss_type=loss_type)
        ported, _ = dpo_loss(MW, ML, RW, RL, beta=5.0, beta_convention="diffusers", loss_type=loss_type)
        assert torch.allclose(official, ported)
    for bad, match in (({"loss_type": "cpo"}, "loss_type"), ({"beta_convention": "half"}, "beta_convention")):
        with pytest.raises(ValueError, match=match):
            dpo_loss(MW, ML, RW, RL, beta=1.0, **bad)


@pytest.mark.parametrize("loss_type, convention, beta", [("sigmoid", "official", 10.0), ("sigmoid", "diffusers", 5.0),
                                                        ("hinge", "official", 10.0), ("ipo", "official", 10.0)])
def test_policy_denoising_winner_better_than_reference_has_positive_logits(loss_type, convention, beta):
    """DPO.compute_loss by hand, for each loss_type and β convention (the same logits z here: official β = 10 is
    diffusers' β = 5)."""
    sched, batch = nice_scheduler(), pair_batch(b=3)
    batch.latents_w = torch.zeros_like(batch.latents_w)  # x_t^w = sqrt(1-ᾱ_t)·ε, so ε = x_t / sqrt(1-ᾱ_t)
    sigma = (1 - sched.alphas_cumprod).sqrt()
    policy = Recorder(lambda noisy, t: noisy / sigma[t].reshape(-1, 1, 1, 1))  # exact on winners only
    reference = Recorder()  # same error on w and l (shared ε)
    cfg = ObjectiveConfig(beta=beta, loss_type=loss_type, beta_convention=convention)
    loss, metrics = DPO().compute_loss(policy, reference, batch, sched, cfg, torch.Generator().manual_seed(0))
    assert metrics["mse_w"] == pytest.approx(0.0, abs=1e-10) and metrics["mse_l"] > 0
    assert metrics["ref_mse_w"] == pytest.approx(metrics["ref_mse_l"], rel=1e-6)
    assert metrics["logit_mean"] == pytest.approx(5.0 * metrics["mse_l"], rel=1e-5)  # ½β·(0 - (0 - mse_l))
    assert metrics["implicit_acc"] == 1.0 and metrics["loss"] == pytest.approx(loss.item())
    assert metrics["model_mse"] == pytest.approx((metrics["mse_w"] + metrics["mse_l"]) / 2, rel=1e-6)
    # per pair by hand: ε = x_t^w / σ_t, policy error on l = (x_t^l - x_t^w) / σ_t, z_i = ½β·mse_l_i
    (noisy, t, _, _), = policy.calls
    eps_w, eps_l = (noisy / sigma[t].reshape(-1, 1, 1, 1)).chunk(2)
    z = 5.0 * (eps_l - eps_w).pow(2).mean(dim=(1, 2, 3))
    assert len(set(z.tolist())) == 3
    assert metrics["sigma_neg_logit_mean"] == pytest.approx(torch.sigmoid(-z).mean().item(), rel=1e-5)
    expected = {"sigmoid": -torch.nn.functional.logsigmoid(z), "hinge": torch.relu(1 - z),
                "ipo": (z / 5.0 - 0.1) ** 2}[loss_type]  # ipo: margin z / s, s = 5, target 1/(2s)
    assert loss.item() == pytest.approx(expected.mean().item(), rel=1e-5)
    if loss_type == "sigmoid":  # the mean of the pairs' losses, not the loss of the mean logit (diffusers#6702)
        assert loss < math.log(2) and loss.item() != pytest.approx(-torch.nn.functional.logsigmoid(z.mean()).item(),
                                                                   rel=1e-3)


def test_sft_weight_adds_the_winners_error_to_the_dpo_loss():
    def run(weight):
        return DPO().compute_loss(Recorder(lambda noisy, t: 0.5 * noisy), Recorder(), pair_batch(b=3), DDPMScheduler(),
                                  ObjectiveConfig(beta=10.0, sft_weight=weight), torch.Generator().manual_seed(0))

    (plain, m0), (anchored, m2) = run(0.0), run(2.0)
    assert m0["mse_w"] == m2["mse_w"] > 0 and m2["loss_dpo"] == pytest.approx(plain.item())
    assert anchored.item() == pytest.approx(plain.item() + 2.0 * m0["mse_w"], rel=1e-6)  # RPO: L_DPO + λ·mse_w
    from t2i_align.config.sections import FieldError
    with pytest.raises(FieldError, match="sft_weight"):
        ObjectiveConfig(name="sft", sft_weight=1.0)
    ObjectiveConfig(name="seppo", sft_weight=1.0)  # allowed: the same anchor on the preferred images
    with pytest.raises(FieldError, match="sft_weight"):
        ObjectiveConfig(sft_weight=-1.0)


def test_winner_and_loser_share_noise_and_timestep():
    batch = pair_batch(b=4, time_ids=True)
    batch.latents_l = batch.latents_w.clone()  # identical images: identical x_t iff ε and t are shared
    policy, reference = Recorder(), Recorder()
    DPO().compute_loss(policy, reference, batch, DDPMScheduler(), ObjectiveConfig(), torch.Generator().manual_seed(0))
    (noisy, t, embeds, tids), = policy.calls
    assert noisy.shape == (8, 4, 4, 4) and torch.equal(t[:4], t[4:]) and torch.equal(noisy[:4], noisy[4:])
    assert len(set(t.tolist())) > 1 and not torch.equal(noisy[0], noisy[1]), "pairs get their own draws"
    assert torch.equal(embeds.prompt_embeds, torch.cat([batch.embeds.prompt_embeds] * 2))
    assert torch.equal(embeds.pooled_prompt_embeds, torch.cat([batch.embeds.pooled_prompt_embeds] * 2))
    assert torch.equal(tids, torch.cat([batch.time_ids_w, batch.time_ids_l]))
    (ref_noisy, ref_t, _, _), = reference.calls
    assert torch.equal(ref_noisy, noisy) and torch.equal(ref_t, t), "reference sees the policy's inputs"


def test_dpo_starts_at_ln2_with_gradients_on_lora_b():
    unet = tiny_sd15_pipeline().unet
    params = adapters.add_lora(unet, LoraConfig(enabled=True, rank=4, init="gaussian"))

    def policy(noisy, t, embeds, time_ids=None):
        return unet(noisy, t, encoder_hidden_states=embeds.prompt_embeds).sample

    def reference(noisy, t, embeds, time_ids=None):
        with adapters.adapters_off(unet):
            return unet(noisy, t, encoder_hidden_states=embeds.prompt_embeds).sample

    loss, metrics = DPO().compute_loss(policy, reference, pair_batch(b=2, size=8), DDPMScheduler(),
                                       ObjectiveConfig(beta=5000.0), torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6) and metrics["implicit_acc"] == 0.5
    loss.backward()
    assert params and all(p.grad is not None for p in params)
    grads = {k: [p.grad.abs().sum().item() for n, p in unet.named_parameters() if k in n] for k in ("lora_A", "lora_B")}
    assert max(grads["lora_B"]) > 0, "σ(0) = ½ ≠ 0: DPO pushes even at z = 0"
    assert max(grads["lora_A"]) == 0.0, "B = 0 at init blocks the gradient to A"


def test_dpo_runs_on_tiny_sdxl_unet_with_time_ids():
    unet = tiny_sdxl_pipeline().unet
    frozen, seen = adapters.frozen_reference(unet, torch.float32), []

    def denoiser(net):
        def denoise(noisy, t, embeds, time_ids=None):
            seen.append((noisy.shape, embeds.prompt_embeds.shape, embeds.pooled_prompt_embeds.shape, time_ids.shape))
            added = text_time_added_cond(embeds, time_ids)
            return net(noisy, t, encoder_hidden_states=embeds.prompt_embeds, added_cond_kwargs=added).sample
        return denoise

    batch = pair_batch(b=2, size=8, time_ids=True)
    batch.embeds = PromptEmbeds(torch.randn(2, 5, 64), torch.randn(2, 32))  # SDXL: 32 + 32 concatenated
    batch.time_ids_w = batch.time_ids_l = torch.tensor([[16.0, 16, 0, 0, 16, 16]] * 2)
    sched = DDPMScheduler(prediction_type="v_prediction")
    loss, metrics = DPO().compute_loss(denoiser(unet), denoiser(frozen), batch, sched, ObjectiveConfig(),
                                       torch.Generator().manual_seed(0))
    assert loss.ndim == 0 and torch.isfinite(loss) and loss.item() == pytest.approx(math.log(2), abs=1e-6)
    assert all(math.isfinite(v) for v in metrics.values())
    assert seen == [((4, 4, 8, 8), (4, 5, 64), (4, 32), (4, 6))] * 2, "[w; l]: 2B rows everywhere"
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in unet.parameters())
    assert all(p.grad is None for p in frozen.parameters())


def test_reference_checks():
    batch, sched, cfg = pair_batch(), DDPMScheduler(), ObjectiveConfig()
    policy = Recorder()
    with pytest.raises(ValueError, match="reference must not be the policy"):
        DPO().compute_loss(policy, policy, batch, sched, cfg)
    with pytest.raises(ValueError, match="needs a reference"):
        DPO().compute_loss(policy, None, batch, sched, cfg)
    with pytest.raises(ValueError, match="reference must not be the policy"):
        SFT().compute_loss(policy, policy, batch, sched, cfg)
    with pytest.raises(TypeError, match="PairBatch"):
        DPO().compute_loss(policy, Recorder(), ImageBatch(batch.latents_w, batch.embeds), sched, cfg)
    # a batch that would train wrongly without a word: one side's SDXL time ids, winners and losers of other sizes
    sdxl = pair_batch(time_ids=True)
    with pytest.raises(ValueError, match="time ids for only one side"):
        DPO().compute_loss(policy, Recorder(), PairBatch(sdxl.latents_w, sdxl.latents_l, sdxl.embeds,
                                                         sdxl.time_ids_w, None), sched, cfg)
    with pytest.raises(ValueError, match=r"winner latents \(2, 4, 4, 4\) and loser latents \(2, 4, 4, 2\) differ"):
        DPO().compute_loss(policy, Recorder(), PairBatch(batch.latents_w, batch.latents_l[..., :2], batch.embeds),
                           sched, cfg)
    assert DPO.needs_reference and not SFT.needs_reference and (DPO.batch_kind, SFT.batch_kind) == ("pairs", "images")


def test_sft_loss_by_hand_with_a_constant_denoiser():
    sched = nice_scheduler()
    batch = ImageBatch(torch.zeros(3, 1, 1, 2), PromptEmbeds(torch.zeros(3, 5, 32)))
    policy = Recorder(lambda noisy, t: torch.full_like(noisy, 0.5))
    loss, metrics = SFT().compute_loss(policy, None, batch, sched, ObjectiveConfig(name="sft"),
                                       torch.Generator().manual_seed(0))
    (noisy, t, _, _), = policy.calls
    eps = noisy / torch.tensor([0.6, 0.8])[t].reshape(-1, 1, 1, 1)  # x0 = 0: x_t = sqrt(1-ᾱ_t)·ε
    expected = sum((0.5 - e) ** 2 for e in eps.flatten().tolist()) / 6  # 3 images × 2 elements
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert set(metrics) == {"loss", "mse"} and metrics["mse"] == pytest.approx(expected, rel=1e-5)


def test_sft_on_pairs_uses_only_the_preferred_images():
    batch = pair_batch()
    batch.latents_l = torch.full_like(batch.latents_l, float("nan"))
    images = ImageBatch(batch.latents_w, batch.embeds)
    pair_loss, image_loss = (SFT().compute_loss(Recorder(lambda noisy, t: noisy * 0.3), None, b, DDPMScheduler(),
                                                ObjectiveConfig(), torch.Generator().manual_seed(1))[0]
                             for b in (batch, images))
    assert torch.isfinite(pair_loss) and pair_loss.item() == image_loss.item()


def test_get_objective_registry():
    assert isinstance(get_objective("dpo"), DPO) and isinstance(get_objective("sft"), SFT)
    with pytest.raises(ValueError, match="objective.name = 'ppo' is not an objective; "
                                         "available: dpo, reward_backprop, seppo, sft"):
        get_objective("ppo")


@pytest.mark.parametrize("family", ["sd15", "sdxl", "sdxl-no-zeros"])
def test_objectives_guide_against_what_the_pipeline_guides_against(family, tmp_path):
    """SePPO's reference samples and reward fine-tuning's rollouts (ObjectiveContext.empty_embeds) guide against
    the unconditional side the galleries and RAFT use (`prompt_embeds_kwargs`): zeros for SDXL, "" for SD1.5 and
    for an SDXL folder whose model_index.json sets force_zeros_for_empty_prompt false."""
    import json
    from types import SimpleNamespace

    from helpers import save_tiny_pipeline

    from t2i_align.config import ModelConfig
    from t2i_align.models import build_pipeline, load_components
    from t2i_align.objectives.context import ObjectiveContext
    from t2i_align.sampling import prompt_embeds_kwargs

    folder = save_tiny_pipeline(family[:4], tmp_path / family)
    if family == "sdxl-no-zeros":
        index = json.loads((folder / "model_index.json").read_text())
        (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    comp = load_components(ModelConfig(pretrained=str(folder)))
    ctx = ObjectiveContext(comp, SimpleNamespace(device=torch.device("cpu")), None, comp.unet)
    pipe_side = prompt_embeds_kwargs(build_pipeline(comp), comp, ["a cat", "a dog"])
    ours = ctx.empty_embeds(2)
    torch.testing.assert_close(ours.prompt_embeds, pipe_side["negative_prompt_embeds"])
    if family == "sdxl":
        assert ours.prompt_embeds.abs().sum() == 0
        torch.testing.assert_close(ours.pooled_prompt_embeds, pipe_side["negative_pooled_prompt_embeds"])
    else:
        assert ours.prompt_embeds.abs().sum() > 0


def test_min_snr_weights_by_hand():
    sched = nice_scheduler()  # ᾱ = [0.64, 0.36]: SNR = 16/9 at t = 0, 9/16 at t = 1
    t = torch.tensor([0, 1, 0])
    assert diffusion.min_snr_weights(sched, t, 1.0).tolist() == pytest.approx([9 / 16, 1.0, 9 / 16])
    assert diffusion.min_snr_weights(sched, t, 5.0).tolist() == pytest.approx([1.0, 1.0, 1.0])
    sched.register_to_config(prediction_type="v_prediction")  # min(SNR, γ) / (SNR + 1)
    assert diffusion.min_snr_weights(sched, t, 1.0).tolist() == pytest.approx([9 / 25, 9 / 25, 9 / 25])
    assert diffusion.min_snr_weights(sched, t, 5.0).tolist() == pytest.approx([16 / 25, 9 / 25, 16 / 25])


def test_min_snr_weight_at_zero_terminal_snr_is_its_limit():
    sched = diffusion.zero_terminal_snr(DDPMScheduler(num_train_timesteps=10))
    last = torch.tensor([9])
    assert diffusion.min_snr_weights(sched, last, 5.0).tolist() == [1.0]  # ε: min(SNR, γ) / SNR -> 1
    sched.register_to_config(prediction_type="v_prediction")
    assert diffusion.min_snr_weights(sched, last, 5.0).tolist() == [0.0]


def test_sft_with_snr_gamma_weights_each_sample_by_hand():
    sched = nice_scheduler()
    batch = ImageBatch(torch.zeros(3, 1, 1, 2), PromptEmbeds(torch.zeros(3, 5, 32)))
    policy = Recorder(lambda noisy, t: torch.full_like(noisy, 0.5))
    loss, metrics = SFT().compute_loss(policy, None, batch, sched, ObjectiveConfig(name="sft", snr_gamma=1.0),
                                       torch.Generator().manual_seed(0))
    (noisy, t, _, _), = policy.calls
    eps = noisy / torch.tensor([0.6, 0.8])[t].reshape(-1, 1, 1, 1)
    per_image = [sum((0.5 - e) ** 2 for e in row.flatten().tolist()) / 2 for row in eps]
    weights = [9 / 16 if step == 0 else 1.0 for step in t.tolist()]
    assert set(t.tolist()) == {0, 1}  # seed 0 draws both steps, so the weights differ
    assert loss.item() == pytest.approx(sum(w * m for w, m in zip(weights, per_image)) / 3, rel=1e-5)
    assert metrics["mse"] == pytest.approx(sum(per_image) / 3, rel=1e-5)


def test_snr_gamma_is_refused_outside_sft():
    with pytest.raises(ValueError, match="snr_gamma = 5.0: expected 0 unless objective.name is sft"):
        ObjectiveConfig(name="dpo", snr_gamma=5.0)
    with pytest.raises(ValueError, match="snr_gamma = -1.0: expected a finite number >= 0"):
        ObjectiveConfig(name="sft", snr_gamma=-1.0)
