"""What a run trains on, built before output_dir changes: the checks that need no model, then the model, its
trainable parameters (LoRA, PPD's branch or every weight), the frozen reference copy, the data source and the
prepared optimizer. Everything here can still fail on the user's settings; nothing here writes in output_dir."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from .adapters import add_lora, frozen_reference, trainable_parameters
from .config import Config, ConfigError
from .data.sources import build_data_source
from .engines import is_fsdp, on_every, say
from .models import load_components, torch_dtype
from .optim import effective_lr, make_lr_scheduler, make_optimizer


def check_before_loading(cfg: Config, batch_kind: str, gallery_weights: bool = True, data_files: bool = True,
                         devices: bool = False) -> None:
    """Mistakes found before the model loads (a minute for SDXL): data that cannot feed the objective, pair data
    that is not there (with `data_files`; the toy demo's are yet to be made), a reward named that does not exist,
    takes other options or whose weights are not there (the gallery's with `gallery_weights`: the main process
    alone loads them, `check_gallery_weights`), a DDIM chain longer than a local model folder's schedule; with
    `devices` (the run, not the dry run, which may be made on another machine), a reward's device option naming a
    GPU this machine lacks (it failed once the model had loaded, naming no setting)."""
    from .data.sources import check_data_files, check_data_kind
    from .validation import check_gallery_direction

    check_data_kind(cfg, batch_kind)
    if data_files:
        check_data_files(cfg)
    _check_method_settings(cfg, batch_kind)
    _check_reward("tracking.validation_reward", cfg.tracking.validation_reward, cfg.tracking.validation_reward_options,
                  gallery_weights, devices)
    check_gallery_direction(cfg)
    if cfg.raft.enabled:
        _check_reward("raft.reward", cfg.raft.reward, cfg.raft.reward_options, devices=devices)
    if cfg.objective.name == "reward_backprop":
        _check_reward("reward_backprop.reward", cfg.reward_backprop.reward, cfg.reward_backprop.reward_options,
                      devices=devices)
    _check_chain_steps_in_folder(cfg)


def check_gallery_weights(accelerator, cfg: Config) -> None:
    """Collective: the gallery reward's weights, on the main process (which alone loads them); every process stops
    if they are not there (the others would wait for it in their next collective)."""
    from .engines import on_main

    on_main(accelerator, lambda: _check_reward("tracking.validation_reward", cfg.tracking.validation_reward,
                                               cfg.tracking.validation_reward_options),
            "the main process could not find tracking.validation_reward's weights")


def _check_reward(setting: str, name, options, paths: bool = True, devices: bool = False) -> None:
    from reward_models.base import resolve_device
    from reward_models.options import check_reward

    if name:
        try:
            check_reward(name, dict(options), paths=paths)
        except (ValueError, OSError) as err:  # RewardSetupError, WeightsNotFoundError
            raise ConfigError(f"{setting}: {err}") from None
    device = dict(options).get("device") if name and devices else None
    if device is not None:
        try:
            resolve_device(str(device))
        except ValueError as err:
            raise ConfigError(f"{setting}_options.device: {err}") from None


def _check_method_settings(cfg: Config, batch_kind: str) -> None:
    """RAFT's objective-dependent settings and prompts, PPD's user table, a differentiable reward for reward
    fine-tuning, an attention package that is installed."""
    from .models import check_attention_installed

    check_attention_installed(cfg.model.attention)
    if cfg.raft.enabled:
        from .data.online import check_online_settings

        check_online_settings(cfg.raft, batch_kind == "pairs")
    if cfg.ppd.enabled:
        from .users.training import load_training_table

        load_training_table(cfg.ppd.table, cfg.ppd.layers)
    if cfg.objective.name == "reward_backprop":
        from .objectives.reward_backprop import check_differentiable, check_direction

        check_differentiable(cfg.reward_backprop.reward)
        check_direction(cfg)


def _chain(cfg: Config) -> Optional[Tuple[str, int]]:
    """(setting, steps) of the DDIM chain the objective samples in training; None without one."""
    chains = {"seppo": ("seppo.sample_steps", cfg.seppo.sample_steps),
              "reward_backprop": ("reward_backprop.num_steps", cfg.reward_backprop.num_steps)}
    return chains.get(cfg.objective.name)


def _check_chain_steps(cfg: Config, scheduler) -> None:
    """The DDIM chains an objective samples in training fit the model's schedule: too many steps failed in DDIM's
    set_timesteps at the first step, a traceback after the model load and the cache build."""
    from .rollout import ddim_sampler

    chain = _chain(cfg)
    if chain is None:
        return
    setting, steps = chain
    try:
        ddim_sampler(scheduler, steps)
    except ValueError:
        raise ConfigError(f"{setting}={steps} is more DDIM steps than this model's schedule "
                          f"({scheduler.config.num_train_timesteps} timesteps) can take: give fewer") from None


def _check_chain_steps_in_folder(cfg: Config) -> None:
    """`_check_chain_steps` before the model loads, on the scheduler built from a local model folder's
    scheduler_config.json (no weights), as `load_components` builds it. A hub id, or a folder not there or
    damaged, is left to the dry run's folder check and the load."""
    if _chain(cfg) is None:
        return
    from diffusers import DDPMScheduler

    from .diffusion import latent_scheduler
    from .model_folders import ModelLoadError, local_model_folder

    try:
        folder = local_model_folder(cfg.model.pretrained, ("vae",) if cfg.model.vae else (),
                                    revision=cfg.model.revision, variant=cfg.model.variant)
        config = None if folder is None else DDPMScheduler.load_config(folder, subfolder="scheduler")
    except (ModelLoadError, OSError, ValueError):
        return
    if config is not None:
        _check_chain_steps(cfg, latent_scheduler(DDPMScheduler, config))


def _trainable(cfg: Config, components, needs_reference: bool):
    """(trainable parameters, frozen reference copy or None). A full fine-tune trains every UNet weight against a
    frozen copy; otherwise only adapters train (LoRA when lora.enabled, then PPD's user branch when ppd.enabled,
    added after the attention backend and before accelerate wraps the UNet) and the base is every adapter off."""
    unet = components.unet
    own = list(unet.parameters())  # the UNet's own weights, before adapters wrap or join them
    if cfg.full_finetune:
        params, frozen = trainable_parameters(unet, cfg.lora), None
        if needs_reference:
            frozen = frozen_reference(unet, torch_dtype(cfg.model.weight_dtype))
            if cfg.train.offload_reference:
                frozen.to("cpu")
        return params, frozen
    if cfg.lora.enabled:
        params = add_lora(unet, cfg.lora)  # freezes every other weight
    else:
        params = []
        unet.requires_grad_(False)
    if cfg.ppd.enabled:
        from .users.training import add_ppd_branch

        params += add_ppd_branch(components, cfg.ppd)
    if cfg.model.cast_base_unet:  # the frozen base only: adapters, and the user branch's frozen blocks, stay fp32
        dtype = torch_dtype(cfg.model.weight_dtype)
        for param in own:
            if not param.requires_grad:
                param.data = param.data.to(dtype)
    return params, None


def _source(cfg: Config, components, accelerator, batch_kind: str):
    """The batch source; with PPD, without the rows whose user is not in the user table."""
    users = None if components.users is None else components.users.table
    return build_data_source(cfg, components, accelerator, batch_kind, users=users)


def _note_warm_up(cfg: Config, accelerator) -> None:
    """A warm-up as long as the run keeps the learning rate below its peak throughout: told, not refused (a short
    smoke run of a recipe does it on purpose)."""
    tc = cfg.train
    if tc.lr_scheduler != "constant" and tc.lr_warmup_steps >= tc.max_steps:
        say(accelerator, f"note: train.lr_warmup_steps={tc.lr_warmup_steps} is not below train.max_steps="
            f"{tc.max_steps}: the learning rate never reaches train.learning_rate (lower the warm-up for a real run)")


def _note_resolution(cfg: Config, spec, accelerator) -> None:
    """data.resolution defaults to 512 for every family; SDXL's own is 1024 (diffusers' SDXL scripts' default), and
    a config written for SD1.5 and pointed at SDXL would train it at 512 without a word (Turbo trains at 512)."""
    native = spec.default_resolution
    if cfg.raft.enabled:  # RAFT generates at raft.resolution (the model's own when unset)
        return
    if native > 512 and cfg.data.resolution < native and "turbo" not in cfg.model.pretrained.lower():
        say(accelerator, f"note: data.resolution={cfg.data.resolution} is below {spec.name}'s native "
            f"{native} px (configs/{spec.name}/*.yaml set it); this run keeps it as given")


def _note_turbo(cfg: Config, accelerator) -> None:
    """The official code switches to Turbo's timesteps and schedule when "turbo" is in the model's path or id (a hub
    cache folder ends in a commit hash); here they are settings, so a run that looks like Turbo on the base recipe
    is told (it may be meant: no error)."""
    turbo = cfg.objective.timesteps == "turbo" and cfg.objective.zero_terminal_snr
    if "turbo" in cfg.model.pretrained.lower() and cfg.objective.name in ("dpo", "sft", "seppo") and not turbo:
        say(accelerator, f"note: {cfg.model.pretrained} looks like a Turbo model; the official Diffusion-DPO code "
            "trains those with objective.timesteps=turbo objective.zero_terminal_snr=true (as "
            "configs/sdxl/dpo_turbo.yaml); this run keeps the settings as given")


@dataclass
class Built:
    """The model, its trainable parameters, the data and the prepared optimizer (`build`)."""

    components: object
    params: list
    frozen: object
    source: object
    unet: torch.nn.Module
    optimizer: object
    lr_sched: object
    raw_unet: torch.nn.Module


def build(cfg: Config, accelerator, objective) -> Built:
    """Everything that can still fail on the user's settings (model, adapters, data), before output_dir changes."""
    from accelerate.utils import set_seed

    # The same seed on every process while the model is built: LoRA's random A (and PPD's branch) must start equal
    # everywhere; DDP would broadcast the main process's, but FSDP keeps each process's own shard of its own draw.
    set_seed(cfg.seed)
    _note_turbo(cfg, accelerator)
    _note_warm_up(cfg, accelerator)
    components = on_every(accelerator, lambda: load_components(cfg.model, device=accelerator.device),
                          "another process could not load the model (a file missing on its machine?)")
    _note_resolution(cfg, components.spec, accelerator)
    _check_chain_steps(cfg, components.scheduler)
    components.time_ids = cfg.data.time_ids
    params, frozen = _trainable(cfg, components, objective.needs_reference)
    source = _source(cfg, components, accelerator, objective.batch_kind)
    # Different noise per process, reproducible per process, and the same whether a cache was just built or reused
    set_seed(cfg.seed, device_specific=True)
    optimizer = make_optimizer(params, cfg.train, effective_lr(cfg.train, accelerator.num_processes))
    lr_sched = make_lr_scheduler(optimizer, cfg.train, accelerator.num_processes)
    unet, optimizer, lr_sched = accelerator.prepare(components.unet, optimizer, lr_sched)
    # The module itself, not torch.compile's wrapper (`_orig_mod`; accelerate keeps it, and only newer versions
    # take keep_torch_compile=False): exports and the resume check then see the UNet's own parameter names.
    raw_unet = accelerator.unwrap_model(unet)
    raw_unet = getattr(raw_unet, "_orig_mod", raw_unet)
    raw_unet.train()  # from_pretrained gives eval mode: LoRA dropout (and, on older diffusers, checkpointing) off
    if is_fsdp(accelerator):  # fully_shard swapped every parameter for a sharded one (in the optimizer too)
        params = [p for p in raw_unet.parameters() if p.requires_grad]
    return Built(components, params, frozen, source, unet, optimizer, lr_sched, raw_unet)
