"""Batched generation at fixed seeds, returning latents and decoded images.

Every image has its own seed (one `torch.Generator` each), so a base and a tuned model sampled with the same
prompts and seeds start from identical noise, and an image does not depend on the batch it was generated in
(beyond batch-size numerics: the last bits of a latent, a pixel level at most).
Classifier-free guidance runs conditional and unconditional in one batch (diffusers' pipelines do this).
A batch that runs out of accelerator memory is retried in halves.

Pipelines get prompt *embeddings*, never strings: a diffusers pipeline given strings truncates them at 77 tokens
and knows nothing of the text encoding a model was tuned with. `generate` encodes with `encode_prompts` and the
`Components` the pipeline carries (`pipeline_components`), so every sampler (validation, RAFT, sample/*, toy
evaluate) conditions the UNet exactly as training did.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Callable, List, Optional, Sequence, Tuple

import torch

from .conditioning.text import PromptEmbeds, TruncationStats, encode_prompts, read_text_encoding
from .config.sections import TextEncodingConfig
from .diffusion import latent_scheduler, unscale_latents
from .errors import one_line
from .models import vae_precision

if TYPE_CHECKING:
    from .models import Components


@dataclass
class Samples:
    latents: torch.Tensor
    """Final latents in the UNet's (scaled) latent space, [N, C, h, w]."""
    images: torch.Tensor
    """Decoded images, float [N, 3, H, W] in [0, 1]."""
    prompts: List[str]
    seeds: List[int]


SCHEDULERS = {"ddim": "DDIMScheduler", "dpm++": "DPMSolverMultistepScheduler", "euler": "EulerDiscreteScheduler"}


def set_scheduler(pipe, name: Optional[str]):
    """Swap the pipeline's sampler ("ddim", "dpm++", "euler"; None keeps the folder's), keeping its noise schedule."""
    if name is None:
        return pipe
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of {', '.join(SCHEDULERS)}")
    import diffusers

    pipe.scheduler = latent_scheduler(getattr(diffusers, SCHEDULERS[name]), pipe.scheduler.config)
    return pipe


def load_pipeline(model: str | Path, lora: Optional[str | Path] = None, device: str = "cpu",
                  scheduler: Optional[str] = None, text_encoding: Optional[str] = None, dtype: str = "fp32",
                  variant: Optional[str] = None, unet: Optional[str | Path] = None, vae: Optional[str | Path] = None):
    """A diffusers pipeline from a local folder ("toy" for the shipped toy model), optionally with LoRA weights;
    a PPD user branch (user_branch.safetensors in the LoRA folder, beside a `unet` checkpoint or in the model folder)
    is loaded as well.
    Every part in `dtype` ("fp32", "fp16", "bf16": one dtype, whatever each part was saved in); weights of
    `variant` where the folder holds it (else its plain weights: a base and a tuned export take one flag), else of
    the one variant a folder without plain weights holds (`weight_files.weights_variant`); no safety checker (we
    sample latents and decode them ourselves; a folder may leave it out).

    It samples (`generate`) in the text encoding recorded with the weights (`read_text_encoding`: the LoRA's
    folder first, then the model folder), else in `text_encoding` ("clip77" / "segments"), else in clip77. An
    explicit `text_encoding` that contradicts the record is an error: a model tuned on one encoding has not
    learned the other. `unet`: a UNet-only checkpoint replacing the folder's UNet before any adapter loads
    (`unet_checkpoint.load_unet_checkpoint`). `vae`: a VAE (its folder, or a pipeline folder holding vae/) to decode
    with instead of the folder's, as a run trained with `model.vae` (its LoRA export records it) decoded.
    """
    from diffusers import DiffusionPipeline
    from safetensors import SafetensorError

    from .model_folders import check_vae_scale, load_lora
    from .pipeline_checks import check_pipeline_tokenizers, given_parts
    from .base_model import note_recorded_vae
    from .models import ModelLoadError, check_latent_channels, dtype_kwargs, load_vae_folder, torch_dtype
    from .weight_files import check_clip_text_layout, weights_variant
    from .unet_checkpoint import checkpoint_folders, load_unet_checkpoint
    from .users.inference import attach_user_branch, branch_file, has_lora_file

    path, encoding = check_weights(model, lora, text_encoding, unet=unet, variant=variant, vae=vae)
    lora = None if lora is None else Path(lora)
    found = weights_variant(path, variant, "--variant", fallback=True)
    check_clip_text_layout(path)
    own = None if vae is None else load_vae_folder(str(vae), lambda config: torch_dtype(dtype), variant, key="--vae")
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path), **dtype_kwargs(torch_dtype(dtype)), variant=found,
                                                 **given_parts(path, own))
    except (OSError, ValueError, SafetensorError) as err:  # a damaged or truncated file the folder checks miss
        raise ModelLoadError(f"could not load the pipeline in {path}: {type(err).__name__}: {one_line(err)[:300]}; "
                             "the folder may be damaged or incomplete: download or copy it again") from err
    check_pipeline_tokenizers(pipe, path)
    if vae is not None:
        check_vae_scale(path, pipe.vae, f"--vae {vae}")
    elif lora is not None:
        note_recorded_vae(lora)
    if unet is not None:  # the variant asked for, not the base's only one: the checkpoint's may differ
        pipe.unet = load_unet_checkpoint(unet, pipe.unet, variant)
    check_latent_channels(pipe.unet, pipe.vae, str(unet or path), "--vae" if vae is not None else "its vae/")
    # PPD: a user branch next to the adapters, or beside a full model's unet/ (a --unet checkpoint's first)
    attach_user_branch(pipe, lora, *checkpoint_folders(unet), path)
    if lora is not None and (branch_file(lora) is None or has_lora_file(lora)):  # a PPD folder may hold no LoRA
        load_lora(pipe, lora, path)
    pipe.set_progress_bar_config(disable=True)
    spec = pipeline_components(pipe, encoding).spec
    if spec.vae_fp32 and pipe.vae.dtype != torch.float32 and pipe.vae.config.get("force_upcast", True):
        # SDXL's VAE overflows in fp16 (black images), fp32 in bf16 too, as in training (models._load_vae); torch's:
        # diffusers' warns "modules ... should be kept in float32: []"
        torch.nn.Module.to(pipe.vae, torch.float32)
    return set_scheduler(pipe, scheduler).to(device)


def check_weights(model: str | Path, lora: Optional[str | Path] = None, text_encoding: Optional[str] = None,
                  key: str = "model.pretrained", unet: Optional[str | Path] = None,
                  variant: Optional[str] = None, vae=None) -> Tuple[Path, TextEncodingConfig]:
    """Before loading anything (scripts check every model they will sample first): the model folder, the LoRA path
    holding weights (or a PPD user branch), and an asked text encoding agreeing with the one recorded with them
    (or with a `unet` checkpoint: a full export of ours given as `--unet` records the encoding it was tuned with).
    ModelLoadError naming what is wrong (the model as `key`, a script's flag); else (model folder, text encoding to
    sample with). A hub id is fetched in `variant` (its other weights are not downloaded). With `vae` (--vae) the
    folder needs no vae/ of its own (a base a run trained with model.vae)."""
    from .models import ModelLoadError, resolve_pretrained
    from .users.inference import branch_file, has_lora_file

    path = resolve_pretrained(str(model), variant=variant, key=key, skip_parts=("vae",) if vae else ())
    if lora is not None:
        lora = Path(lora)
        if not lora.exists():
            raise ModelLoadError(f"LoRA weights not found: {lora} (expected pytorch_lora_weights.safetensors or "
                                 "the folder holding it)")
        if lora.is_dir() and not has_lora_file(lora) and branch_file(lora) is None:
            if (lora / "model_index.json").is_file():  # a full fine-tune's final/: a whole pipeline
                raise ModelLoadError(f"{lora} is a whole pipeline (a full fine-tune's export), not LoRA weights: give "
                                     "it as --model, without --lora")
            if (lora / "t2i_align_checkpoint.json").is_file():  # checkpoints.MARKER: a run's training state
                from .resume_settings import export_hint

                raise ModelLoadError(export_hint(lora))
            raise ModelLoadError(f"no LoRA weights in {lora}: it holds no pytorch_lora_weights.safetensors (give the "
                                 "run's final/ folder or the file itself)")
        weights = lora / "pytorch_lora_weights.safetensors" if lora.is_dir() else lora
        if weights.is_file():
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(weights), framework="pt"):
                    pass
            except (SafetensorError, OSError) as err:
                raise ModelLoadError(f"LoRA weights {weights} are not a safetensors file ({err}): give "
                                     "pytorch_lora_weights.safetensors or the folder holding it") from None
    if lora is not None:
        from .base_model import warn_other_base

        warn_other_base(str(model), path, lora, unet)
    return path, recorded_text_encoding(path, lora, text_encoding, unet)


def recorded_text_encoding(model_dir: Path, lora: Optional[Path] = None, requested: Optional[str] = None,
                           unet: Optional[str | Path] = None) -> TextEncodingConfig:
    """The text encoding to sample a model with: the LoRA's record, else the UNet checkpoint's (beside its unet/
    folder or in it), else the model folder's, else `requested`, else clip77. `requested` contradicting a record
    raises ModelLoadError."""
    from .models import ModelLoadError

    from .unet_checkpoint import checkpoint_folders

    for where in [w for w in [lora, *checkpoint_folders(unet), model_dir] if w is not None]:
        recorded = read_text_encoding(where)
        if recorded is None:
            continue
        if requested is not None and requested != recorded.kind:
            raise ModelLoadError(
                f"{where} was tuned with text encoding {recorded.kind!r} (recorded in its "
                f"t2i_align_text_encoding.json) but {requested!r} was asked for; sample it with {recorded.kind!r} "
                "(or leave the text encoding unset to use the recorded one)")
        return recorded
    return TextEncodingConfig(kind=requested or "clip77")


def pipeline_components(pipe, text_encoding: Optional[TextEncodingConfig] = None) -> "Components":
    """The `Components` whose text parts and text encoding `generate` encodes `pipe`'s prompts with.

    A pipeline from `models.build_pipeline` or `load_pipeline` carries them; any other diffusers SD1.5 / SDXL
    pipeline gets a view of its own tokenizers and text encoders (its `scheduler` is the pipeline's sampler), in
    clip77, attached to it. A given `text_encoding` replaces the carried one.
    """
    from .models import FAMILIES, PIPELINE_COMPONENTS, Components, ModelLoadError

    carried = getattr(pipe, PIPELINE_COMPONENTS, None)
    if carried is not None:
        if text_encoding is None:
            return carried
        view = replace(carried, text_encoding=text_encoding)
    else:
        name = type(pipe).__name__
        spec = next((f for f in FAMILIES.values() if name in (f.sampling_pipeline, *f.pipeline_classes)), None)
        if spec is None:
            raise ModelLoadError(f"cannot sample with a {name}; use a StableDiffusionPipeline or "
                                 "StableDiffusionXLPipeline")
        tokenizers = [getattr(pipe, tok, None) for tok, _ in spec.text_components]
        encoders = [getattr(pipe, enc, None) for _, enc in spec.text_components]
        lacking = [part for pair in spec.text_components for part in pair if getattr(pipe, part, None) is None]
        if lacking:  # it said "no tokenizer or text encoder" when only SDXL's text_encoder_2 was missing
            raise ModelLoadError(f"this {name} has no {' or '.join(lacking)}; t2i-align encodes the prompts itself "
                                 "and needs every tokenizer and text encoder of the model")
        view = Components(spec, tokenizers, encoders, pipe.vae, pipe.unet, pipe.scheduler,
                          Path(pipe.config.get("_name_or_path") or "."), encoders[0].dtype,
                          truncation=TruncationStats(totals=""), text_encoding=text_encoding or TextEncodingConfig())
    setattr(pipe, PIPELINE_COMPONENTS, view)
    return view


def seeds_for(num_prompts: int, per_prompt: int, base_seed: int = 0) -> List[List[int]]:
    """Seed k of prompt i is base_seed + 10_000·k + i: fixed per (prompt, k), independent of batching."""
    return [[base_seed + 10_000 * k + i for k in range(per_prompt)] for i in range(num_prompts)]


def prompt_major(prompts: Sequence, per_prompt: int, base_seed: int = 0) -> Tuple[List, List[int]]:
    """(each prompt repeated per_prompt times, the matching `seeds_for` seeds): prompt i's images are rows
    i·per_prompt .. i·per_prompt + per_prompt - 1."""
    flat = [p for p in prompts for _ in range(per_prompt)]
    return flat, [s for row in seeds_for(len(prompts), per_prompt, base_seed) for s in row]


def _decode(pipe, latents: torch.Tensor, slice_size: int = 4) -> torch.Tensor:
    """[0, 1] images, `slice_size` latents per VAE call: the decoder works at full resolution, and a 32-image
    chunk of SDXL at 1024 px in one call needs tens of GB for its activations."""
    vae, images = pipe.vae, []
    for part in latents.split(slice_size):
        with vae_precision(vae):
            images.append(vae.decode(unscale_latents(vae, part).to(vae.dtype)).sample.float())
    return (torch.cat(images) / 2 + 0.5).clamp(0, 1)


def _check_inputs(pipe, prompts: Sequence[str], seeds: Sequence[int], user_tokens) -> None:
    """One seed (and user-token row) per prompt; a UNet with a PPD user branch samples for a user: without one,
    diffusers' UNet fails deep inside (a TypeError on its missing image embeddings)."""
    from .conditioning.users import UserBranchError, has_user_branch

    if user_tokens is not None and len(user_tokens) != len(prompts):
        raise ValueError(f"generate got {len(user_tokens)} rows of user tokens for {len(prompts)} prompts")
    if len(prompts) != len(seeds):
        raise ValueError(f"generate got {len(prompts)} prompts but {len(seeds)} seeds; give one seed per image")
    if not prompts:
        raise ValueError("generate got no prompts")
    if user_tokens is None and has_user_branch(pipe.unet):
        raise UserBranchError("this model has a PPD user branch, so it samples for a user, and none was given: "
                              "sample/generate.py, gallery.py and compare.py take --user ID (python -m "
                              "t2i_align.toy evaluate samples no user)")


def _check_steps(pipe, steps: int, setting: str = "--steps") -> None:
    """A UserError for more sampling steps than the scheduler has timesteps (DDIM said so in a traceback, DPM++ and
    Euler failed with an IndexError), before the first batch, naming the `setting` that asked for them."""
    from .errors import UserError

    limit = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if limit is None:
        return
    try:  # on a copy: DDIM's "leading" spacing with steps_offset 1 reaches timestep 1000 at 1000 steps
        probe = type(pipe.scheduler).from_config(pipe.scheduler.config)
        probe.set_timesteps(steps)
        fits = steps <= limit and int(probe.timesteps.max()) < limit  # Euler's sigmas run out beyond `limit`
    except (ValueError, IndexError):
        fits = False
    if not fits:
        raise UserError(f"{steps} sampling steps are more than this model's scheduler ({limit} timesteps) can take: "
                        f"give fewer ({setting})")


@torch.no_grad()
def generate(pipe, prompts: Sequence[str], seeds: Sequence[int], *, num_inference_steps: int = 20,
             guidance_scale: float = 3.0, batch_size: int = 64, negative_prompt: Optional[str] = None,
             height: Optional[int] = None, width: Optional[int] = None,
             progress: Optional[Callable[[int], object]] = None,
             user_tokens: Optional[torch.Tensor] = None, retry_oom: bool = True,
             on_batch: Optional[Callable[[Samples], object]] = None, steps_setting: str = "--steps") -> Samples:
    """Sample one image per (prompt, seed) pair, `batch_size` images at a time.

    Prompts are encoded with `encode_prompts` in the pipeline's text encoding (`pipeline_components`) and handed
    to the pipeline as embeddings; with clip77 the images are the ones the pipeline makes from the strings.
    `progress`, if given, is called after each batch with the number of images it finished (a tqdm bar's
    `update` fits), so long sampling runs can show a progress bar. `user_tokens` [N, T, D], one row per image:
    PPD's user for a UNet with a user branch (both sides of guidance carry the same user: `pipeline_user_embeds`).
    Out of GPU memory, a batch is retried at half the size, unless `retry_oom` is False: where sampling is
    collective (FSDP), one process retrying alone would pair its weight gathers with other blocks' on the others.
    `on_batch`: called with each finished batch's Samples, which are then not kept (the result's latents and
    images are empty): thousands of decoded images (12.6 MB each for SDXL in float32) need not fit in memory at once.
    Images with NaN pixels (a diverged model, an fp16 VAE overflowing) are counted and warned about.
    `steps_setting`: the flag or setting a too-large `num_inference_steps` is named by in the error."""
    _check_inputs(pipe, prompts, seeds, user_tokens)
    _check_steps(pipe, num_inference_steps, steps_setting)
    components = pipeline_components(pipe)
    kwargs = dict(num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, height=height,
                  width=width, negative_prompt=negative_prompt)
    latents, images, start, nan_images = [], [], 0, 0
    while start < len(prompts):
        chunk, size = slice(start, start + batch_size), min(batch_size, len(prompts) - start)
        try:
            users = None if user_tokens is None else user_tokens[chunk]
            lat, img = _generate_chunk(pipe, components, list(prompts[chunk]), list(seeds[chunk]), users=users,
                                       **kwargs)
        except torch.OutOfMemoryError:
            if size == 1 or not retry_oom:
                raise
            lat = img = None
        if lat is None:  # out of the except block: its traceback no longer holds the batch's tensors
            batch_size = size // 2  # half the batch that failed, not of a batch size larger than what was left
            _empty_cache()
            continue
        nan_images += int(img.isnan().flatten(1).any(1).sum())
        if on_batch is None:
            latents.append(lat)
            images.append(img)
        else:
            on_batch(Samples(lat, img, list(prompts[chunk]), [int(s) for s in seeds[chunk]]))
        start += len(lat)
        if progress is not None:
            progress(len(lat))
    if nan_images:
        name = pipe.config.get("_name_or_path", "") or "the model"  # two sides' warnings stay apart
        warnings.warn(f"{nan_images} of {len(prompts)} images of {name} decoded to NaN pixels (a diverged model, or an "
                      "fp16 VAE overflowing: sample in bf16 or fp32); they come out black and score as NaN")
    if on_batch is not None:  # what was handed on is not kept (latents: 256 kB per SDXL image, GBs over 10k)
        return Samples(torch.empty(0), torch.empty(0, 3, 0, 0), list(prompts), [int(s) for s in seeds])
    return Samples(torch.cat(latents), torch.cat(images), list(prompts), [int(s) for s in seeds])


def zeros_for_empty_prompt(components: "Components") -> bool:
    """Whether the family's pipeline guides against zeros rather than the encoding of "" when there is no
    negative prompt (SDXL's `force_zeros_for_empty_prompt`): model_index.json's value, else the class default."""
    import inspect

    import diffusers

    from .models import read_index

    default = inspect.signature(getattr(diffusers, components.spec.sampling_pipeline)).parameters.get(
        "force_zeros_for_empty_prompt")
    return bool(read_index(components.path).get("force_zeros_for_empty_prompt",
                                                 default is not None and default.default))


def prompt_embeds_kwargs(pipe, components: "Components", prompts: List[str],
                         negative_prompt: Optional[str] = None) -> dict:
    """`prompt_embeds`, `negative_prompt_embeds` (and SDXL's pooled pair) for a pipeline call on `prompts`.

    The negative side is what the pipeline itself would use: the encoding of `negative_prompt`, or of "" when
    there is none, except that a pipeline configured with `force_zeros_for_empty_prompt` (SDXL) uses zeros then.
    Both sides have the same length, whatever the text encoding.
    """
    embeds = encode_prompts(components, prompts)
    if negative_prompt is None and pipe.config.get("force_zeros_for_empty_prompt", False):  # an explicit "" is encoded
        pooled = embeds.pooled_prompt_embeds
        negative = PromptEmbeds(torch.zeros_like(embeds.prompt_embeds),
                                None if pooled is None else torch.zeros_like(pooled))
    else:
        # One row per prompt, as the pipeline encodes it: a batch of one, repeated, differs in the last bits.
        negative = encode_prompts(components, ["" if negative_prompt is None else negative_prompt] * len(prompts))
    kwargs = {"prompt_embeds": embeds.prompt_embeds, "negative_prompt_embeds": negative.prompt_embeds}
    if embeds.pooled_prompt_embeds is not None:
        kwargs.update(pooled_prompt_embeds=embeds.pooled_prompt_embeds,
                      negative_pooled_prompt_embeds=negative.pooled_prompt_embeds)
    return kwargs


def _generate_chunk(pipe, components: "Components", prompts: List[str], seeds: List[int],
                    negative_prompt: Optional[str], users: Optional[torch.Tensor] = None, **kwargs):
    gens = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds]
    embeds = prompt_embeds_kwargs(pipe, components, prompts, negative_prompt)
    if users is not None:
        from .conditioning.users import pipeline_user_embeds

        guided = kwargs["guidance_scale"] > 1 and pipe.unet.config.get("time_cond_proj_dim") is None
        embeds["ip_adapter_image_embeds"] = pipeline_user_embeds(users.to(pipe.unet.device, pipe.unet.dtype),
                                                                 do_classifier_free_guidance=guided)
    out = pipe(generator=gens, output_type="latent", **embeds, **kwargs)
    lat = out.images.to(pipe.unet.device)
    return lat.cpu(), _decode(pipe, lat).cpu()


def _empty_cache() -> None:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
