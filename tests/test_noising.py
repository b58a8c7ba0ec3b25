"""How the denoising objectives draw their training noise: Turbo's timesteps, zero terminal SNR, input
perturbation and the (ε, t) shared by DPO's [w; l], against numbers computed by hand."""
from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler

from helpers import one_torch_thread, save_tiny_pipeline  # noqa: F401
from t2i_align import diffusion
from t2i_align.config import ConfigError, ObjectiveConfig

SD_BETAS = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def flat_scheduler(abar: float = 0.64, steps: int = 4) -> SimpleNamespace:
    """ᾱ_t = `abar` at every t, so x_t = 0.8·x_0 + 0.6·noise for the default."""
    return SimpleNamespace(alphas_cumprod=torch.full((steps,), abar),
                           config=SimpleNamespace(num_train_timesteps=steps, prediction_type="epsilon"))


def test_turbo_timesteps_are_the_official_mapping_of_the_uniform_draw():
    scheduler = DDPMScheduler(**SD_BETAS)  # T = 1000
    uniform = diffusion.sample_timesteps(scheduler, 400, torch.Generator().manual_seed(0))
    turbo = diffusion.sample_timesteps(scheduler, 400, torch.Generator().manual_seed(0), kind="turbo")
    assert torch.equal(turbo, 250 * (uniform % 4) + 249)
    assert set(turbo.tolist()) == {249, 499, 749, 999}
    with pytest.raises(ValueError, match="timestep set"):
        diffusion.sample_timesteps(scheduler, 2, kind="lightning")
    with pytest.raises(ValueError, match="at least 4 steps"):
        diffusion.sample_timesteps(flat_scheduler(steps=3), 2, kind="turbo")


def test_default_pair_noising_draws_as_the_inline_code_it_replaced():
    """Seeded runs from before `noised` are unchanged: ε of the pair's shape, then t, shared by [w; l]."""
    scheduler, latents = DDPMScheduler(**SD_BETAS), torch.randn(6, 4, 3, 3)
    for offset in (0.0, 0.1):
        gen = torch.Generator().manual_seed(11)
        noise = diffusion.sample_noise((3, 4, 3, 3), gen, offset=offset).repeat(2, 1, 1, 1)
        t = diffusion.sample_timesteps(scheduler, 3, gen).repeat(2)
        old = (diffusion.add_noise(scheduler, latents, noise, t), t, diffusion.training_target(scheduler, latents,
                                                                                               noise, t))
        new_gen = torch.Generator().manual_seed(11)
        new = diffusion.noised(scheduler, latents, new_gen, repeats=2, offset=offset)
        assert all(torch.equal(a, b) for a, b in zip(old, new))
        assert torch.equal(torch.randn(2, generator=gen), torch.randn(2, generator=new_gen))  # same draws used


def test_zero_terminal_snr_by_hand_and_the_original_is_untouched():
    # sqrt ᾱ = [0.9, 0.6, 0.2] -> shifted [0.7, 0.4, 0] -> scaled by 0.9 / 0.7: [0.9, 0.514286, 0]; squared below
    original = SimpleNamespace(alphas_cumprod=torch.tensor([0.81, 0.36, 0.04]))
    rescaled = diffusion.zero_terminal_snr(original)
    assert torch.allclose(rescaled.alphas_cumprod, torch.tensor([0.81, 0.264490, 0.0]), atol=1e-6)
    assert original.alphas_cumprod.tolist() == pytest.approx([0.81, 0.36, 0.04])


def test_zero_terminal_snr_equals_diffusers_rescaled_betas_on_the_sd_schedule():
    plain = DDPMScheduler(**SD_BETAS)
    ours = diffusion.zero_terminal_snr(plain).alphas_cumprod
    theirs = DDPMScheduler(rescale_betas_zero_snr=True, **SD_BETAS).alphas_cumprod
    assert float(ours[-1]) == 0.0 and float(plain.alphas_cumprod[-1]) > 0.004
    assert torch.allclose(ours, theirs, atol=1e-6)


def test_input_perturbation_moves_x_t_but_not_the_target():
    # Seed 5: ε is the first draw [2, 1, 1, 2], t the next (T = 4), ξ the one after; x_0 = 0, ᾱ = 0.64.
    gen = torch.Generator().manual_seed(5)
    eps = torch.randn((2, 1, 1, 2), generator=gen)
    t = torch.randint(0, 4, (2,), generator=gen)
    xi = torch.randn((2, 1, 1, 2), generator=gen)
    x0 = torch.zeros(2, 1, 1, 2)
    noisy, got_t, target = diffusion.noised(flat_scheduler(), x0, torch.Generator().manual_seed(5), perturbation=0.1)
    assert torch.equal(got_t, t) and torch.equal(target, eps)
    assert torch.allclose(noisy, 0.6 * (eps + 0.1 * xi))
    plain, _, _ = diffusion.noised(flat_scheduler(), x0, torch.Generator().manual_seed(5))
    assert torch.allclose(plain, 0.6 * eps)


def test_pairs_share_noise_timestep_and_perturbation():
    # Winner 1, loser -1 everywhere: x_t = ±0.8 + 0.6·(ε + γξ) with the same ε, ξ and t for both halves.
    # T = 8, so Turbo's 2·(u mod 4) + 1 lands on odd steps only (at T = 4 it is the identity: nothing to check).
    latents = torch.cat([torch.ones(3, 2, 2, 2), -torch.ones(3, 2, 2, 2)])
    noisy, t, target = diffusion.noised(flat_scheduler(steps=8), latents, torch.Generator().manual_seed(1),
                                        repeats=2, perturbation=0.5, timesteps="turbo")
    gen = torch.Generator().manual_seed(1)
    torch.randn((3, 2, 2, 2), generator=gen)  # ε is drawn first, then the uniform u
    u = torch.randint(0, 8, (3,), generator=gen)
    assert u.tolist() == [5, 1, 1] and t.tolist() == [3] * 6  # 2·(5 mod 4) + 1 = 2·1 + 1 = 3, for both halves
    assert torch.equal(target[:3], target[3:])
    assert torch.allclose(noisy[:3] - noisy[3:], torch.full((3, 2, 2, 2), 1.6))
    with pytest.raises(ValueError, match="equal blocks"):
        diffusion.noised(flat_scheduler(), latents[:5], repeats=2)


def test_noising_settings_are_checked_and_only_for_objectives_that_draw_noise():
    assert ObjectiveConfig(name="sft", timesteps="turbo", input_perturbation=0.1).noising == dict(
        offset=0.0, perturbation=0.1, timesteps="turbo")
    with pytest.raises(ConfigError, match="timesteps"):
        ObjectiveConfig(timesteps="lightning")
    for kind in diffusion.TIMESTEP_SETS:  # the config's choices (checked without importing torch) are the math's
        assert ObjectiveConfig(timesteps=kind).timesteps == kind
    with pytest.raises(ConfigError, match="input_perturbation"):
        ObjectiveConfig(input_perturbation=1.5)
    for setting in (dict(zero_terminal_snr=True), dict(timesteps="turbo"), dict(noise_offset=0.1)):
        with pytest.raises(ConfigError, match="unless objective.name is dpo, sft or seppo"):
            ObjectiveConfig(name="reward_backprop", **setting)


def test_a_turbo_looking_model_on_the_base_recipe_gets_a_note(capsys):
    from t2i_align.build import _note_turbo
    from t2i_align.config import load_config

    accelerator = SimpleNamespace(print=print)
    _note_turbo(load_config(None, ["model.pretrained=/models/sdxl-turbo/"]), accelerator)
    assert "objective.timesteps=turbo" in capsys.readouterr().err
    hub_cache = "/hf/hub/models--stabilityai--sdxl-turbo/snapshots/71153311d3dbb46851df1931d3ca6e939de83304"
    _note_turbo(load_config(None, [f"model.pretrained={hub_cache}"]), accelerator)
    assert "looks like a Turbo model" in capsys.readouterr().err
    _note_turbo(load_config(None, ["model.pretrained=sdxl-turbo", "objective.timesteps=turbo"]), accelerator)
    assert "objective.zero_terminal_snr=true" in capsys.readouterr().err  # half the recipe still gets the note
    for overrides in (["model.pretrained=/models/sdxl-turbo", "objective.timesteps=turbo",
                       "objective.zero_terminal_snr=true"], ["model.pretrained=/models/sdxl-base"]):
        _note_turbo(load_config(None, overrides), accelerator)
        assert capsys.readouterr().err == ""


def test_the_turbo_recipe_trains_on_four_steps_of_a_zero_terminal_snr_schedule(tmp_path, monkeypatch):
    """The loop hands the objective the rescaled schedule (ᾱ_T = 0, so a quarter of the draws see pure noise)
    while galleries sample with the folder's."""
    from helpers import write_rendered_pairs

    from t2i_align.config import load_config
    from t2i_align.loop import train

    seen, original = [], diffusion.noised
    monkeypatch.setattr(diffusion, "noised", lambda scheduler, *a, **k: seen.append(
        (float(scheduler.alphas_cumprod[-1]), k)) or original(scheduler, *a, **k))
    model = save_tiny_pipeline("sd15", tmp_path / "sd-turbo")
    data = write_rendered_pairs(tmp_path / "pairs.parquet", n=4, size=16)
    out = tmp_path / "run"
    train(load_config(None, [f"model.pretrained={model}", f"data.path={data}", f"output_dir={out}",
                             "data.resolution=16", "train.batch_size=2", "lora.enabled=true", "train.max_steps=2",
                             "train.log_every=1", "tracking.wandb=off", "tracking.sample_steps=2",
                             "tracking.validation_seeds=1", "objective.timesteps=turbo",
                             "objective.zero_terminal_snr=true", "objective.input_perturbation=0.1"]))
    assert [terminal for terminal, _ in seen] == [0.0, 0.0]
    assert all(k == dict(repeats=2, offset=0.0, perturbation=0.1, timesteps="turbo") for _, k in seen)
    losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(np.isfinite(losses))
    assert (out / "gallery" / "index.html").is_file()
