"""reward_backprop (LongAlign stage 2) on the toy pipeline: the loss is -scale · mean reward of the images diffusers'
own DDIM pipeline makes from the same noise; gradients reach the LoRA weights only through the chosen steps;
the decomposed-clip direction is fitted once, saved with the run and reloaded on resume; wrong rewards and
settings fail with messages."""
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import one_torch_thread  # noqa: F401  (fixture)
from t2i_align.config import ConfigError, load_config
from t2i_align.objectives.reward_backprop import DIRECTION_FILE, RewardBackprop

CONFIG = str(Path(__file__).resolve().parent.parent / "configs" / "toy" / "longalign_reward.yaml")
PROMPTS = ["The picture shows a single red circle. Behind the red circle, the whole background is plain black.",
           "The picture shows a single blue square. The square is small and it sits in the top left part of the "
           "frame. Behind the blue square, the whole background is plain white."]


def toy_cfg(out, *extra):
    return load_config(CONFIG, ["model.pretrained=toy", f"output_dir={out}", "reward_backprop.num_steps=4",
                                "reward_backprop.grad_mode=last", "reward_backprop.grad_k=2", "train.batch_size=2",
                                "tracking.wandb=off", "tracking.sample_steps=2", "tracking.validation_seeds=1",
                                *extra])


def fake_accelerator():
    return SimpleNamespace(device=torch.device("cpu"), is_main_process=True, process_index=0, num_processes=1,
                           wait_for_everyone=lambda: None)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The objective on the toy pipeline with LoRA whose B matrices are random (so the adapters matter)."""
    return objective_on(toy_cfg(tmp_path_factory.mktemp("run"), "reward_backprop.x0_prediction=false"), 32)


def objective_on(cfg, resolution):
    """`cfg`'s model with LoRA whose B matrices are random, its objective set up, a batch of PROMPTS."""
    from t2i_align.batches import BATCH_BUILDERS, make_denoiser
    from t2i_align.adapters import add_lora
    from t2i_align.models import load_components
    from t2i_align.objectives.context import ObjectiveContext

    comps = load_components(cfg.model)
    params = add_lora(comps.unet, cfg.lora)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in comps.unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    objective = RewardBackprop()
    objective.setup(ObjectiveContext(comps, fake_accelerator(), cfg, comps.unet, lora=True))
    batch = BATCH_BUILDERS["prompts"](comps, {"caption": PROMPTS, "resolution": resolution}, torch.device("cpu"))
    return SimpleNamespace(cfg=cfg, comps=comps, params=params, objective=objective, batch=batch,
                           denoise=make_denoiser(comps.unet, comps))


def test_loss_is_minus_scaled_mean_reward_of_diffusers_ddim_samples(setup):
    from diffusers import DDIMScheduler

    from t2i_align.models import build_pipeline
    from t2i_align.rollout import initial_latents

    loss, metrics = setup.objective.compute_loss(setup.denoise, None, setup.batch, setup.comps.scheduler,
                                                 setup.cfg.objective, torch.Generator().manual_seed(7))
    noise = initial_latents((2, 4, 16, 16), torch.Generator().manual_seed(7), setup.objective.sampler)
    pipe = build_pipeline(setup.comps, unet=setup.comps.unet,
                          scheduler=DDIMScheduler.from_config(setup.comps.scheduler.config))
    empty = setup.objective.ctx.empty_embeds(2).prompt_embeds
    with torch.no_grad():  # gradient-free, separately: diffusers' own loop, decode and postprocessing
        images = pipe(prompt_embeds=setup.batch.embeds.prompt_embeds, negative_prompt_embeds=empty, latents=noise,
                      num_inference_steps=4, guidance_scale=3.0, output_type="pt").images
        scores, info = setup.objective.reward(images, PROMPTS)
    assert loss.item() == pytest.approx(-0.5 * scores.mean().item(), rel=1e-4, abs=1e-6)
    assert metrics["reward"] == pytest.approx(scores.mean().item(), rel=1e-4, abs=1e-6)
    # The logged parts are LongAlign's decomposition: S = relevant + irrelevant, S_ω = relevant + 0.3·irrelevant.
    assert metrics["reward_total"] == pytest.approx(metrics["reward_relevant"] + metrics["reward_irrelevant"],
                                                    abs=1e-6)
    assert metrics["reward"] == pytest.approx(metrics["reward_relevant"] + 0.3 * metrics["reward_irrelevant"],
                                              abs=1e-6)
    assert metrics["reward_total"] == pytest.approx(sum(info["total"]) / 2, rel=1e-4, abs=1e-6)


def test_reward_info_means_are_python_floats_of_the_per_image_lists():
    """Batch means of the reward's per-image lists and its truncation count, as floats (tensors made here would sit
    on the CPU beside the GPU metrics); other entries are left out."""
    from t2i_align.objectives.reward_backprop import reward_info_means

    info = {"total": [0.25, 0.75, 0.5], "eta": [1, 2, 3], "truncated": 2, "cosine": [0.1], "arch": "ViT"}
    means = reward_info_means(info, 3)
    assert means == {"reward_total": 0.5, "reward_eta": 2.0, "reward_truncated": 2.0}
    assert all(type(v) is float for v in means.values())


def lora_grads(setup, steps, monkeypatch, calls=None, reference=None):
    import t2i_align.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "choose_grad_steps", lambda *a, **k: list(steps))

    def policy(x, t, embeds, time_ids=None):
        if calls is not None:
            calls.append(torch.is_grad_enabled())
        return setup.denoise(x, t, embeds, time_ids)

    for p in setup.params:
        p.grad = None
    loss, _ = setup.objective.compute_loss(policy, reference, setup.batch, setup.comps.scheduler,
                                           setup.cfg.objective, torch.Generator().manual_seed(3))
    forward_calls = list(calls) if calls is not None else None
    loss.backward()
    return [p.grad.clone() for p in setup.params], forward_calls


def test_gradients_reach_the_lora_weights_only_through_the_chosen_steps(setup, monkeypatch):
    calls = []
    both, _ = lora_grads(setup, [1, 3], monkeypatch, calls)
    # Forward: the UNet ran with autograd on exactly at steps 1 and 3 of 4 (checkpointing reruns those two in
    # backward, which is why only the calls before backward are counted).
    assert calls[:4] == [False, True, False, True]
    first, _ = lora_grads(setup, [1], monkeypatch)
    last, _ = lora_grads(setup, [3], monkeypatch)
    # With the UNet input detached, x_0 is linear in each step's ε (the DDIM updates) and every forward value is
    # the same whichever steps carry gradients, so the gradient is the sum of the steps' own contributions.
    for g, g1, g3 in zip(both, first, last):
        assert torch.allclose(g, g1 + g3, rtol=1e-4, atol=1e-9)
    assert sum(float(g.abs().sum()) for g in first) > 0  # an early step gets gradient through the updates
    assert all(p.grad is None for n, p in setup.comps.unet.named_parameters() if "lora_" not in n)


def test_kl_anchor_adds_the_weighted_mean_squared_gap_of_the_guided_predictions(setup, monkeypatch):
    import t2i_align.rollout as rollout_module

    monkeypatch.setattr(rollout_module, "choose_grad_steps", lambda *a, **k: [1, 3])
    monkeypatch.setattr(setup.cfg.reward_backprop, "kl_weight", 2.0)
    calls = []

    def reference(x, t, embeds, time_ids=None):  # every output shifted by 0.1: so is the guided prediction
        calls.append(torch.is_grad_enabled())
        return setup.denoise(x, t, embeds, time_ids) + 0.1

    def run(ref):
        return setup.objective.compute_loss(setup.denoise, ref, setup.batch, setup.comps.scheduler,
                                            setup.cfg.objective, torch.Generator().manual_seed(3))

    plain, plain_metrics = run(None)
    loss, metrics = run(reference)
    assert calls == [False, False]  # once per gradient step, without autograd
    assert metrics["kl"] == pytest.approx(0.1 ** 2, rel=1e-4)
    assert loss.item() == pytest.approx(plain.item() + 2.0 * 0.01, rel=1e-4)
    assert metrics["reward"] == plain_metrics["reward"] and "kl" not in plain_metrics


def test_the_kl_anchor_pulls_the_lora_gradients_in_proportion_to_its_weight(setup, monkeypatch):
    """The KL term carries gradient to the LoRA weights (its value alone was checked: a detached ε_θ passed), and
    the loss is linear in kl_weight, so its share of the gradient doubles with the weight."""
    def reference(x, t, embeds, time_ids=None):
        return setup.denoise(x, t, embeds, time_ids) + 0.1

    plain, _ = lora_grads(setup, [1, 3], monkeypatch)
    shares = []
    for weight in (1.0, 2.0):
        monkeypatch.setattr(setup.cfg.reward_backprop, "kl_weight", weight)
        grads, _ = lora_grads(setup, [1, 3], monkeypatch, reference=reference)
        shares.append([g - p for g, p in zip(grads, plain)])
    one, two = (torch.cat([s.flatten() for s in share]) for share in shares)
    assert one.norm() > 1e-6  # (a difference of float32 sums: compared by norm, not element by element)
    assert float((two - 2 * one).norm() / two.norm()) < 1e-2


def test_kl_weight_makes_the_loop_build_a_reference_that_starts_equal(tmp_path):
    from t2i_align.loop import train

    assert not RewardBackprop().configure(toy_cfg(tmp_path, "reward_backprop.kl_weight=0")).needs_reference
    out = tmp_path / "kl"
    train(toy_cfg(out, "reward_backprop.num_steps=2", "reward_backprop.grad_k=1", "train.log_every=1",
                  "train.max_steps=2", "train.learning_rate=1e-2", "train.lr_warmup_steps=0",
                  "reward_backprop.kl_weight=1", "tracking.validation_prompts=[]"))
    kl = [json.loads(line)["kl"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kl[0] == 0.0 < kl[1]  # LoRA starts as a no-op: the base is the reference; one step later it is not


def test_toy_judge_is_refused_with_the_differentiable_choices(tmp_path):
    from t2i_align.objectives.reward_backprop import build_reward

    cfg = toy_cfg(tmp_path, "reward_backprop.reward=toy-judge")
    with pytest.raises(ConfigError, match="'toy-judge' is not a differentiable reward.*decomposed-clip.*toy-clip"):
        build_reward(SimpleNamespace(cfg=cfg), cfg.reward_backprop, "toy:train-long")


@pytest.mark.parametrize("override, key", [("reward_backprop.grad_mode=random", "grad_mode"),
                                           ("reward_backprop.grad_k=3", "grad_k"),
                                           ("reward_backprop.timestep_spacing=even", "timestep_spacing"),
                                           ("reward_backprop.loss_scale=0", "loss_scale"),
                                           ("reward_backprop.kl_weight=-1", "kl_weight")])
def test_bad_settings_fail_at_config_load(override, key):
    with pytest.raises(ConfigError, match=f"reward_backprop.{key}"):
        load_config(None, ["reward_backprop.num_steps=20", override])


def test_direction_fitted_once_saved_and_reloaded_on_resume(tmp_path, monkeypatch):
    from reward_models.decomposed_clip import DecomposedClip, fit_common_direction, load_direction
    from t2i_align.loop import train
    from t2i_align.prompts import read_prompts

    fits, seen = [], []
    original_fit, original_setup = DecomposedClip.fit_direction, RewardBackprop.setup
    monkeypatch.setattr(DecomposedClip, "fit_direction", lambda self, p: fits.append(len(p)) or original_fit(self, p))
    monkeypatch.setattr(RewardBackprop, "setup", lambda self, ctx: original_setup(self, ctx) or seen.append(self))
    common = ["reward_backprop.num_steps=2", "reward_backprop.grad_k=1", "train.log_every=1",
              "train.checkpoint_every=1", "train.learning_rate=1e-3"]
    out, straight = tmp_path / "run", tmp_path / "straight"
    train(toy_cfg(straight, *common, "train.max_steps=3"))
    train(toy_cfg(out, *common, "train.max_steps=2"))
    saved = (out / DIRECTION_FILE).read_bytes()
    train(toy_cfg(out, *common, "train.max_steps=3", "train.resume=latest"))
    assert fits == [300, 300]  # one fit per fresh run (on data.path's 300 training captions), none on resume
    assert (out / DIRECTION_FILE).read_bytes() == saved
    v, meta = load_direction(out / DIRECTION_FILE)
    assert torch.equal(seen[-1].reward.direction, v) and meta["num_prompts"] == "300"
    fitted = fit_common_direction(lambda ps: seen[-1].reward.text_vectors(ps)[0], read_prompts("toy:train-long"))
    assert torch.allclose(v, fitted, atol=1e-6)  # the training prompts' mean, whatever the batches
    losses = [[json.loads(line)["loss"] for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (straight, out)]
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)  # resumed = uninterrupted


def test_a_direction_fitted_on_other_prompts_is_not_silently_reused(tmp_path):
    from reward_models.decomposed_clip import save_direction
    from t2i_align.objectives.reward_backprop import build_reward
    from t2i_align.objectives.context import ObjectiveContext

    cfg = toy_cfg(tmp_path)
    tmp_path.mkdir(exist_ok=True)
    # a file without the digest (not this project's run) passed when every prompt was the fit set (None == None)
    for metadata in ({"prompts_sha256": "0" * 64, "split": "True"}, {"split": "True"}):
        save_direction(tmp_path / DIRECTION_FILE, torch.nn.functional.normalize(torch.ones(64), dim=0), metadata)
        ctx = ObjectiveContext(None, fake_accelerator(), cfg, None)
        with pytest.raises(ConfigError, match="fitted on other prompts than .toy:train-long. .*delete it to refit"):
            build_reward(ctx, cfg.reward_backprop, "toy:train-long")


def test_a_null_direction_is_fitted_once_and_reloaded_as_an_unset_one(tmp_path):
    """`direction: null` went down the fit-once path with the key kept, and the reload passed direction twice: a
    TypeError at every resume and on every process but the main one."""
    from reward_models.decomposed_clip import DecomposedClip
    from t2i_align.objectives.context import ObjectiveContext
    from t2i_align.objectives.reward_backprop import build_reward

    cfg = toy_cfg(tmp_path, "reward_backprop.reward_options.direction=null")
    assert cfg.reward_backprop.reward_options["direction"] is None
    first = build_reward(ObjectiveContext(None, fake_accelerator(), cfg, None), cfg.reward_backprop, "toy:train-long")
    assert (tmp_path / DIRECTION_FILE).is_file()
    again = build_reward(ObjectiveContext(None, fake_accelerator(), cfg, None), cfg.reward_backprop, "toy:train-long")
    assert isinstance(again, DecomposedClip) and torch.equal(again.direction, first.direction)


def test_a_listed_fit_set_of_other_prompts_is_named_by_its_size(tmp_path):
    from reward_models.decomposed_clip import save_direction
    from t2i_align.objectives.context import ObjectiveContext
    from t2i_align.objectives.reward_backprop import build_reward

    listed = [f"a red circle number {i}." for i in range(500)]
    cfg = toy_cfg(tmp_path)
    cfg.reward_backprop.reward_options["fit_prompts"] = listed
    tmp_path.mkdir(exist_ok=True)
    save_direction(tmp_path / DIRECTION_FILE, torch.nn.functional.normalize(torch.ones(64), dim=0), {"split": "True"})
    with pytest.raises(ConfigError, match="fitted on other prompts than the 500 listed prompts") as err:
        build_reward(ObjectiveContext(None, fake_accelerator(), cfg, None), cfg.reward_backprop, "toy:train-long")
    assert "number 499" not in str(err.value)


def test_the_direction_is_fitted_on_a_seeded_sample_of_a_large_prompt_set(tmp_path):
    """LongAlign's 2M captions were all encoded by the main process (hours, the others waiting), and the prompt
    list was the reward's cache key, held for the run: now `fit_max_prompts` of them, drawn with the run's seed,
    and a digest in the key."""
    import random

    from reward_models.decomposed_clip import load_direction, prompts_digest, save_direction
    from t2i_align.objectives.context import ObjectiveContext
    from t2i_align.objectives.reward_backprop import build_reward
    from t2i_align.prompts import read_prompts

    cfg = toy_cfg(tmp_path, "reward_backprop.fit_max_prompts=40", "seed=7")
    ctx = ObjectiveContext(None, fake_accelerator(), cfg, None)
    build_reward(ctx, cfg.reward_backprop, "toy:train-long")
    _, meta = load_direction(tmp_path / DIRECTION_FILE)
    sample = random.Random(7).sample(read_prompts("toy:train-long"), 40)
    assert meta["num_prompts"] == "40" and meta["prompts_sha256"] == prompts_digest(sample)
    assert max(len(key) for key in ctx._rewards) < 1000
    other = toy_cfg(tmp_path, "reward_backprop.fit_max_prompts=40", "seed=8")  # another sample
    with pytest.raises(ConfigError, match="at most reward_backprop.fit_max_prompts=40 of them, drawn with seed 8"):
        build_reward(ObjectiveContext(None, fake_accelerator(), other, None), other.reward_backprop, "toy:train-long")
    # a run fitted on every prompt before fit_max_prompts existed resumes with its own direction
    save_direction(tmp_path / DIRECTION_FILE, torch.nn.functional.normalize(torch.ones(64), dim=0),
                   {"prompts_sha256": prompts_digest(read_prompts("toy:train-long")), "split": "True"})
    build_reward(ObjectiveContext(None, fake_accelerator(), cfg, None), cfg.reward_backprop, "toy:train-long")
    with pytest.raises(ConfigError, match="fit_max_prompts"):
        toy_cfg(tmp_path, "reward_backprop.fit_max_prompts=-1")


def test_the_shipped_sd15_recipe_runs_its_chain_on_a_tiny_sd15(tmp_path, monkeypatch):
    """configs/sd15/longalign_reward.yaml's chain as a whole (tested above in pieces, on the toy's sampler): 50
    trailing DDIM steps 999 ... 19, CFG 7.5, 5 gradient steps one per block of 10 at a shared offset, the UNet
    input detached, the last x0 decoded; the loss -0.5 · mean reward, its gradient reaching the LoRA."""
    from helpers import save_tiny_pipeline
    import t2i_align.rollout as rollout_module

    folder = save_tiny_pipeline("sd15", tmp_path / "sd15")
    cfg = load_config(str(Path(CONFIG).parents[1] / "sd15" / "longalign_reward.yaml"), [
        f"model.pretrained={folder}", f"output_dir={tmp_path / 'run'}", "data.path=toy:train-long",
        "data.resolution=16", "reward_backprop.reward_options.checkpoint=toy",
        "reward_backprop.reward_options.dtype=fp32", "train.mixed_precision=no", "model.weight_dtype=fp32",
        "tracking.wandb=off", "lora.rank=4", "lora.alpha=4", "train.batch_size=2"])
    run = objective_on(cfg, 16)
    chosen, calls, objective, batch = [], [], run.objective, run.batch
    choose = rollout_module.choose_grad_steps
    monkeypatch.setattr(rollout_module, "choose_grad_steps", lambda *a, **k: chosen.extend(choose(*a, **k)) or chosen)

    def policy(x, t, embeds, time_ids=None):
        calls.append((int(t.flatten()[0]), torch.is_grad_enabled(), x.shape[0]))
        return run.denoise(x, t, embeds, time_ids)
    loss, metrics = objective.compute_loss(policy, None, batch, run.comps.scheduler, cfg.objective,
                                           torch.Generator().manual_seed(0))
    forward = calls[:50]
    loss.backward()
    assert [t for t, _, _ in forward] == list(range(999, 0, -20)) and {n for _, _, n in forward} == {4}  # CFG
    assert len(chosen) == 5 and [b - a for a, b in zip(chosen, chosen[1:])] == [10] * 4 and chosen[0] < 10
    assert [i for i, (_, grad, _) in enumerate(forward) if grad] == chosen
    assert batch.embeds.prompt_embeds.shape[1] == 240  # stage 1's segment encoding
    assert loss.item() == pytest.approx(-0.5 * metrics["reward"], rel=1e-5)
    assert sum(float(p.grad.abs().sum()) for p in run.params if p.grad is not None) > 0
