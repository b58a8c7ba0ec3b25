"""The one differentiable DDIM rollout (t2i_align/rollout.py): diffusers parity with gradients off, gradients
only through the chosen steps, hand-derived gradients with and without a detached UNet input, checkpointing."""
import math

import pytest
import torch

from t2i_align.conditioning.text import PromptEmbeds, text_time_added_cond
from t2i_align.rollout import (cat_embeds, choose_grad_steps, ddim_sampler, decode, guidance_inputs,
                               initial_latents, rollout)

from helpers import one_torch_thread, tiny_sd15_pipeline, tiny_sdxl_pipeline  # noqa: F401

PROMPTS = ["a red circle on blue", "a small green square"]


# ---------------------------------------------------------------- which steps carry gradients
def test_choose_grad_steps_fixed_modes():
    assert choose_grad_steps("last", 5, 2) == [3, 4]
    assert choose_grad_steps("last", 5, 1) == [4]
    assert choose_grad_steps("all", 3, 99) == [0, 1, 2]
    assert choose_grad_steps("none", 3) == []


def test_strided_is_longalign_time_all_rand_start_every_tenth():
    offset = int(torch.randint(10, (1,), generator=torch.Generator().manual_seed(7)))
    steps = choose_grad_steps("strided", 50, 5, torch.Generator().manual_seed(7))
    assert steps == [offset, offset + 10, offset + 20, offset + 30, offset + 40]


def test_stratified_one_step_per_stratum_each_equally_likely():
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(10)
    for _ in range(2000):
        steps = choose_grad_steps("stratified", 10, 3, gen)
        # strata [0, 3), [3, 6), [6, 10): j*n//k
        assert len(steps) == 3 and 0 <= steps[0] < 3 <= steps[1] < 6 <= steps[2] < 10
        counts[steps] += 1
    expected = torch.tensor([1 / 3] * 6 + [1 / 4] * 4) * 2000
    assert ((counts - expected).abs() / expected).max() < 0.15  # binomial sd is ~5 % of these counts


def test_choose_grad_steps_rejects_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        choose_grad_steps("strided", 50, 3)
    with pytest.raises(ValueError, match="k <= num_steps"):
        choose_grad_steps("last", 4, 5)
    with pytest.raises(ValueError, match="unknown"):
        choose_grad_steps("first", 4, 1)


# ---------------------------------------------------------------- parity with diffusers (no gradient steps)
@pytest.fixture(scope="module")
def toy_pipe():
    from diffusers import StableDiffusionPipeline

    from t2i_align.toy.assets import pipeline_dir

    pipe = StableDiffusionPipeline.from_pretrained(str(pipeline_dir()), safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unet_denoiser(unet, added=None):
    def denoise(x, t, embeds, time_ids=None):
        kwargs = added(embeds, time_ids) if added else None
        return unet(x, t, encoder_hidden_states=embeds.prompt_embeds, added_cond_kwargs=kwargs).sample
    return denoise


@pytest.mark.parametrize("prediction_type,guidance,eta", [("epsilon", 3.0, 0.0), ("v_prediction", 5.0, 0.0),
                                                          ("epsilon", 1.0, 0.5)])
def test_rollout_equals_stable_diffusion_pipeline(toy_pipe, prediction_type, guidance, eta):
    from diffusers import DDIMScheduler, DDPMScheduler

    pipe = toy_pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type=prediction_type)
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 2)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=8,
                        guidance_scale=guidance, eta=eta, generator=torch.Generator().manual_seed(3),
                        output_type="latent").images
        training = DDPMScheduler.from_config(pipe.scheduler.config)  # what the loop holds
        gen = torch.Generator().manual_seed(3)
        x_t = initial_latents((2, 4, 16, 16), gen, pipe.scheduler)
        got = rollout(unet_denoiser(pipe.unet), PromptEmbeds(cond), PromptEmbeds(uncond), training, x_t,
                      num_steps=8, guidance_scale=guidance, eta=eta, generator=gen)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert training.num_inference_steps is None and len(training.timesteps) == 1000  # not set_timesteps'd


def test_decode_equals_the_pipeline_images(toy_pipe):
    from diffusers import DDIMScheduler

    pipe = toy_pipe
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, prediction_type="epsilon")
    cond, uncond = pipe.encode_prompt(PROMPTS, "cpu", 1, True, negative_prompt=[""] * 2)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, num_inference_steps=5,
                        guidance_scale=3.0, generator=torch.Generator().manual_seed(4), output_type="pt").images
        x_t = initial_latents((2, 4, 16, 16), torch.Generator().manual_seed(4), pipe.scheduler)
        x0 = rollout(unet_denoiser(pipe.unet), PromptEmbeds(cond), PromptEmbeds(uncond[:1]), pipe.scheduler, x_t,
                     num_steps=5, guidance_scale=3.0)  # a one-row uncond is repeated per image
        images = decode(pipe.vae, x0, grad=False)
    assert images.shape == (2, 3, 32, 32) and images.min() >= -1 and images.max() <= 1
    torch.testing.assert_close(images / 2 + 0.5, expected, atol=1e-5, rtol=1e-5)


def test_sdxl_rollout_equals_the_sdxl_pipeline_with_time_ids():
    from diffusers import DDIMScheduler

    pipe = tiny_sdxl_pipeline()
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    cond, uncond, pooled, uncond_pooled = pipe.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1,
                                                             do_classifier_free_guidance=True,
                                                             negative_prompt=[""] * 2)
    with torch.no_grad():
        expected = pipe(prompt_embeds=cond, negative_prompt_embeds=uncond, pooled_prompt_embeds=pooled,
                        negative_pooled_prompt_embeds=uncond_pooled, num_inference_steps=4, guidance_scale=4.0,
                        generator=torch.Generator().manual_seed(5), output_type="latent").images
        x_t = initial_latents((2, 4, 8, 8), torch.Generator().manual_seed(5), pipe.scheduler)
        size = 16  # default height = unet sample_size 8 x vae_scale_factor 2
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)  # (orig, crop, target)
        got = rollout(unet_denoiser(pipe.unet, text_time_added_cond), PromptEmbeds(cond, pooled),
                      PromptEmbeds(uncond, uncond_pooled), pipe.scheduler, x_t, num_steps=4, guidance_scale=4.0,
                      time_ids=time_ids)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_guidance_batch_is_uncond_first_and_keeps_every_field():
    cond = PromptEmbeds(torch.ones(2, 3, 4), torch.ones(2, 5))
    uncond = PromptEmbeds(torch.zeros(1, 3, 4), torch.zeros(1, 5))
    both, time_ids, cfg = guidance_inputs(cond, uncond, torch.arange(6.0)[None], 2, 7.5)
    assert cfg and both.prompt_embeds[:2].eq(0).all() and both.prompt_embeds[2:].eq(1).all()
    assert both.pooled_prompt_embeds[:2].eq(0).all() and both.pooled_prompt_embeds[2:].eq(1).all()
    assert both.pooled_prompt_embeds.shape == (4, 5) and time_ids.tolist() == [list(range(6))] * 4
    plain, _, cfg = guidance_inputs(cond, None, None, 2, 1.0)
    assert not cfg and plain is cond
    with pytest.raises(ValueError, match="uncond_embeds"):
        guidance_inputs(cond, None, None, 2, 3.0)
    with pytest.raises(ValueError, match="pooled_prompt_embeds"):
        cat_embeds(cond, PromptEmbeds(torch.zeros(1, 3, 4)))


# ---------------------------------------------------------------- gradients, by hand on a linear denoiser
class LinearDenoiser(torch.nn.Module):
    """eps = a·x + mean(prompt embeds): records, per call, whether grad mode was on and the input needed grad."""

    def __init__(self, a: float):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(a, dtype=torch.float64))
        self.calls = []

    def forward(self, x, t, embeds, time_ids=None):
        self.calls.append((torch.is_grad_enabled(), x.requires_grad))
        return self.a * x + embeds.prompt_embeds.double().mean((1, 2))[:, None, None, None]


def ddim_coefficients(scheduler, num_steps):
    """Per step (A, B) with x_prev = A·x_t + B·eps for DDIM, eta 0, epsilon prediction (in the step's float32)."""
    sampler = ddim_sampler(scheduler, num_steps)
    out = []
    for t in sampler.timesteps.tolist():
        prev = t - 1000 // num_steps
        at = sampler.alphas_cumprod[t]
        ap = sampler.alphas_cumprod[prev] if prev >= 0 else sampler.final_alpha_cumprod
        a_coef = (ap ** 0.5 / at ** 0.5).item()
        out.append((a_coef, ((1 - ap) ** 0.5).item() - ap.item() ** 0.5 * ((1 - at) ** 0.5 / at ** 0.5).item()))
    return out


@pytest.fixture
def schedule():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                         clip_sample=False, set_alpha_to_one=False)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
@pytest.mark.parametrize("grad_steps,detach", [((0, 1), False), ((0, 1), True), ((1,), False), ((1,), True),
                                               ((0,), False), ((0,), True)])
def test_gradient_of_a_two_step_chain_by_hand(schedule, grad_steps, detach, guidance):
    """eps = a·x + c (c: the guided bias of the prompt embeddings), so x1 = A1·x2 + B1·(a·x2 + c) and
    x0 = A0·x1 + B0·(a·x1' + c), x1' the denoiser's input (x1, or x1 detached). Hence

    d x0/da = B0·x1·[step 1 has grad] + A0·B1·x2·[step 0 has grad] + B0·a·B1·x2·[both, input not detached]:
    the last term is the path through the denoiser's input, the one `detach_input` cuts (LongAlign)."""
    (a1, b1), (a0, b0) = ddim_coefficients(schedule, 2)
    a = 0.3
    x2 = torch.randn(2, 4, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    model = LinearDenoiser(a)
    cond, uncond = PromptEmbeds(torch.full((2, 3, 4), 0.5)), PromptEmbeds(torch.full((1, 3, 4), -0.2))
    x0 = rollout(model, cond, uncond, schedule, x2, num_steps=2, guidance_scale=guidance, grad_steps=grad_steps,
                 detach_input=detach)
    x0.sum().backward()
    bias = 0.5 if guidance == 1.0 else -0.2 + guidance * (0.5 + 0.2)  # eps_u + g (eps_c - eps_u)
    x1_sum = ((a1 + b1 * a) * x2 + b1 * bias).sum().item()
    expected = (b0 * x1_sum * (1 in grad_steps) + a0 * b1 * x2.sum().item() * (0 in grad_steps)
                + b0 * a * b1 * x2.sum().item() * (grad_steps == (0, 1) and not detach))
    assert math.isclose(model.a.grad.item(), expected, rel_tol=1e-5)
    # grad mode on exactly at the chosen steps; the input needs grad only past a gradient step, undetached
    assert [on for on, _ in model.calls] == [0 in grad_steps, 1 in grad_steps]
    assert model.calls[1][1] == (grad_steps == (0, 1) and not detach)


def test_x0_prediction_of_one_step_by_hand(schedule):
    """One step at t: x0_pred = (x_t - sqrt(1 - ᾱ_t)·eps) / sqrt(ᾱ_t), eps = a·x_t + 0.5 (no CFG)."""
    x_t = torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    alpha = ddim_sampler(schedule, 1).alphas_cumprod[1].double()  # one step: t = 0 + steps_offset 1
    x0 = rollout(LinearDenoiser(0.3), PromptEmbeds(torch.full((1, 3, 4), 0.5)), None, schedule, x_t, num_steps=1,
                 guidance_scale=1.0, x0_prediction=True)
    torch.testing.assert_close(x0, (x_t - (1 - alpha).sqrt() * (0.3 * x_t + 0.5)) / alpha.sqrt(), rtol=1e-6,
                               atol=1e-6)


def test_trailing_spacing_gives_longalign_timesteps():
    from diffusers import DDIMScheduler

    trailing = DDIMScheduler.from_config(DDIMScheduler(steps_offset=1).config, timestep_spacing="trailing")
    assert ddim_sampler(trailing, 50).timesteps.tolist() == list(range(999, 0, -20))  # 999, 979, ..., 19


def test_no_gradient_steps_leave_no_graph(schedule):
    model = LinearDenoiser(0.3)
    x0 = rollout(model, PromptEmbeds(torch.zeros(1, 3, 4)), None, schedule, torch.randn(1, 4, 2, 2,
                 dtype=torch.float64), num_steps=3, guidance_scale=1.0)
    assert not x0.requires_grad and [on for on, _ in model.calls] == [False] * 3
    with pytest.raises(ValueError, match="outside"):
        rollout(model, PromptEmbeds(torch.zeros(1, 3, 4)), None, schedule, torch.zeros(1, 4, 2, 2), num_steps=3,
                guidance_scale=1.0, grad_steps=[3])


# ---------------------------------------------------------------- checkpointing on a real (tiny) UNet
@pytest.mark.parametrize("detach", [True, False])
def test_checkpointing_gives_the_same_gradients(detach):
    pipe = tiny_sd15_pipeline()
    unet, calls = pipe.unet, []
    inner = unet_denoiser(unet)

    def denoiser(x, t, embeds, time_ids=None):
        calls.append(torch.is_grad_enabled())
        return inner(x, t, embeds, time_ids)

    cond = PromptEmbeds(torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1)))
    uncond = PromptEmbeds(torch.zeros(1, 5, 32))
    grads = []
    for ckpt in (False, True):
        unet.zero_grad(set_to_none=True)
        calls.clear()
        x_t = initial_latents((2, 4, 8, 8), torch.Generator().manual_seed(2), pipe.scheduler)
        x0 = rollout(denoiser, cond, uncond, pipe.scheduler, x_t, num_steps=4, guidance_scale=3.0,
                     grad_steps=[1, 3], detach_input=detach, checkpoint=ckpt)
        (x0 ** 2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in unet.named_parameters() if p.grad is not None})
        # checkpointing recomputes the two gradient steps in backward: 4 forward calls + 2 recomputations
        assert len(calls) == (6 if ckpt else 4)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == len(list(unet.parameters()))
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-6, rtol=1e-5)
    assert any(g.abs().sum() > 0 for g in grads[0].values())


def test_decode_with_and_without_gradients():
    vae = tiny_sd15_pipeline().vae.requires_grad_(False)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        direct = vae.decode(latents / vae.config.scaling_factor).sample.clamp(-1, 1)
    frozen = decode(vae, latents.requires_grad_(), grad=False)
    assert not frozen.requires_grad
    torch.testing.assert_close(frozen, direct)
    grads = []
    for ckpt in (False, True):
        latents.grad = None
        decode(vae, latents, grad=True, checkpoint=ckpt).sum().backward()
        grads.append(latents.grad.clone())
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_a_scheduler_config_without_clip_sample_never_clips_latents(tmp_path):
    """SDXL-style folders whose scheduler config was saved by an Euler scheduler have no clip_sample key: the
    training DDPMScheduler, and every DDIM built from it (rollouts, LongAlign, `--scheduler ddim`), took DDIM's
    default True and clipped x̂_0 to [-1, 1] in latent space. A config that says true is followed."""
    from diffusers import DDIMScheduler

    from t2i_align.config import ModelConfig
    from t2i_align.diffusion import latent_scheduler
    from t2i_align.models import load_components
    from t2i_align.objectives.reward_backprop import sampling_scheduler
    from t2i_align.sampling import set_scheduler
    from helpers import save_tiny_pipeline

    folder = save_tiny_pipeline("sdxl", tmp_path / "sdxl")
    assert "clip_sample" not in (folder / "scheduler" / "scheduler_config.json").read_text()
    scheduler = load_components(ModelConfig(pretrained=str(folder))).scheduler
    assert scheduler.config.clip_sample is False
    assert ddim_sampler(scheduler, 4).config.clip_sample is False
    assert sampling_scheduler(scheduler, "trailing").config.clip_sample is False
    assert set_scheduler(tiny_sdxl_pipeline(), "ddim").scheduler.config.clip_sample is False
    assert latent_scheduler(DDIMScheduler, {"clip_sample": True}).config.clip_sample is True
