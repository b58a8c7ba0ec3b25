"""Shared diffusion math against numbers computed by hand."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDPMScheduler

from t2i_align import diffusion


def nice_scheduler(prediction_type: str = "epsilon") -> DDPMScheduler:
    """Two steps with betas 0.36, 0.4375: ᾱ = [0.64, 0.36], so (sqrt ᾱ, sqrt(1-ᾱ)) = (0.8, 0.6) and (0.6, 0.8)."""
    return DDPMScheduler(num_train_timesteps=2, trained_betas=[0.36, 0.4375], prediction_type=prediction_type)


def test_per_sample_mse_by_hand():
    pred = torch.tensor([1.0, 2.0, 0.0, -1.0]).reshape(2, 1, 1, 2)
    target = torch.tensor([0.0, 0.0, 0.5, 1.0]).reshape(2, 1, 1, 2)
    # sample 0: (1² + 2²) / 2 = 2.5; sample 1: (0.5² + 2²) / 2 = 2.125
    mse = diffusion.per_sample_mse(pred, target)
    assert mse.shape == (2,) and mse.dtype == torch.float32
    assert torch.allclose(mse, torch.tensor([2.5, 2.125]))


def test_per_sample_mse_of_fp16_is_computed_in_fp32():
    # 300² = 90000 overflows fp16 (max 65504); in fp32 the mean is (90000 + 0) / 2 = 45000.
    pred = torch.tensor([300.0, 0.0, 1.0, 1.0], dtype=torch.float16).reshape(2, 1, 1, 2)
    target = torch.zeros(2, 1, 1, 2, dtype=torch.float16)
    mse = diffusion.per_sample_mse(pred, target)
    assert mse.dtype == torch.float32
    assert mse.tolist() == [45000.0, 1.0]
    with pytest.raises(ValueError, match="shape"):
        diffusion.per_sample_mse(pred, target[:1])


def test_add_noise_and_targets_by_hand():
    x0 = torch.tensor([2.0, -1.0]).reshape(2, 1, 1, 1)
    eps = torch.tensor([1.0, 3.0]).reshape(2, 1, 1, 1)
    t = torch.tensor([0, 1])
    eps_sched, v_sched = nice_scheduler(), nice_scheduler("v_prediction")
    # x_t = sqrt(ᾱ) x0 + sqrt(1-ᾱ) ε: 0.8·2 + 0.6·1 = 2.2 ; 0.6·(-1) + 0.8·3 = 1.8
    noisy = diffusion.add_noise(eps_sched, x0, eps, t)
    assert torch.allclose(noisy.flatten(), torch.tensor([2.2, 1.8]), atol=1e-6)
    assert torch.allclose(noisy, eps_sched.add_noise(x0, eps, t), atol=1e-6)
    # epsilon: the noise itself (the very tensor)
    assert diffusion.training_target(eps_sched, x0, eps, t) is eps
    # v = sqrt(ᾱ) ε - sqrt(1-ᾱ) x0: 0.8·1 - 0.6·2 = -0.4 ; 0.6·3 - 0.8·(-1) = 2.6
    v = diffusion.training_target(v_sched, x0, eps, t)
    assert torch.allclose(v.flatten(), torch.tensor([-0.4, 2.6]), atol=1e-6)
    assert torch.allclose(v, v_sched.get_velocity(x0, eps, t), atol=1e-6)


def test_v_target_on_a_real_schedule_uses_alphas_cumprod_at_t():
    sched = DDPMScheduler(prediction_type="v_prediction", beta_schedule="scaled_linear",
                          beta_start=0.00085, beta_end=0.012)
    x0, eps, t = torch.full((1, 4, 2, 2), 0.5), torch.full((1, 4, 2, 2), -2.0), torch.tensor([700])
    abar = float(sched.alphas_cumprod[700])
    expected = abar ** 0.5 * -2.0 - (1 - abar) ** 0.5 * 0.5
    v = diffusion.training_target(sched, x0, eps, t)
    assert torch.allclose(v, torch.full_like(v, expected), atol=1e-6)


def test_unknown_prediction_type_raises():
    sched = DDPMScheduler(prediction_type="sample")
    x = torch.zeros(1, 1, 1, 1)
    with pytest.raises(ValueError, match="prediction_type 'sample'"):
        diffusion.training_target(sched, x, x, torch.tensor([0]))


def test_sample_timesteps_uniform_over_all_steps_and_seeded():
    sched = nice_scheduler()
    t = diffusion.sample_timesteps(sched, 400, generator=torch.Generator().manual_seed(0))
    assert t.dtype == torch.long and t.shape == (400,)
    assert set(t.tolist()) == {0, 1}, "0..T-1 inclusive, nothing else"
    assert 150 < int(t.sum()) < 250, "about half of the draws are the last step"
    big = diffusion.sample_timesteps(DDPMScheduler(), 5000, generator=torch.Generator().manual_seed(1))
    assert int(big.min()) >= 0 and int(big.max()) == 999
    again = diffusion.sample_timesteps(DDPMScheduler(), 5000, generator=torch.Generator().manual_seed(1))
    assert torch.equal(big, again)


def test_sample_noise_shape_dtype_and_seed():
    a = diffusion.sample_noise((2, 4, 3, 3), torch.Generator().manual_seed(3), dtype=torch.float16)
    b = diffusion.sample_noise((2, 4, 3, 3), torch.Generator().manual_seed(3), dtype=torch.float16)
    assert a.shape == (2, 4, 3, 3) and a.dtype == torch.float16 and torch.equal(a, b)


def test_noise_offset_adds_one_draw_per_sample_and_channel_after_eps():
    # eps is seed 7's first draw of shape [2, 2, 2, 2], z the same generator's next draw, of shape [2, 2, 1, 1].
    gen = torch.Generator().manual_seed(7)
    eps, z = torch.randn((2, 2, 2, 2), generator=gen), torch.randn((2, 2, 1, 1), generator=gen)
    got = diffusion.sample_noise((2, 2, 2, 2), torch.Generator().manual_seed(7), offset=0.1)
    assert torch.allclose(got, eps + 0.1 * z)
    # Constant over each image's pixels: (got - eps) is 0.1·z everywhere in sample 1, channel 0.
    assert torch.allclose(got[1, 0] - eps[1, 0], torch.full((2, 2), 0.1 * float(z[1, 0, 0, 0])))
    plain = diffusion.sample_noise((2, 2, 2, 2), torch.Generator().manual_seed(7))
    assert torch.equal(plain, eps)


def test_noise_offset_out_of_range_is_a_config_error():
    from t2i_align.config import ConfigError, ObjectiveConfig

    with pytest.raises(ConfigError, match="noise_offset"):
        ObjectiveConfig(noise_offset=-0.1)
