"""The `reward_backprop` config section (its own module, as methods.py; `Config` imports it).

Reward fine-tuning through a differentiable sampling chain (`objective.name: reward_backprop`,
t2i_align/objectives/reward_backprop.py). Defaults are LongAlign's stage 2 (Liu et al. 2024, arXiv 2410.11817;
official `unet_reward.py`): 50 DDIM steps at 999 … 19, CFG 7.5, 5 gradient steps one per block of 10 at a shared
random offset, UNet input detached and checkpointed on them, the last step's x0-prediction decoded, Denscore
decomposed with ω = 0.3 (`reward_options.omega`). Not `loss_scale`: 1 (the plain reward) here, LongAlign's
gradient scale of 0.5 in configs/*/longalign_reward.yaml.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional

from .sections import _check, _check_at_least, _check_choice

GRAD_MODES = ("stratified", "strided", "last", "all")
SPACINGS = ("leading", "trailing", "linspace")


@dataclass
class RewardBackpropConfig:
    reward: str = "decomposed-clip"
    """A differentiable reward of the registry (`t2i-score --reward` names): decomposed-clip, clip, toy-clip,
    pickscore, hpsv2, aesthetic, imagereward, vp-score. toy-judge is not differentiable and is refused."""
    reward_options: Dict[str, Any] = field(default_factory=dict)
    """Keyword options of the reward, e.g. {checkpoint: /w/denscore, omega: 0.3}. decomposed-clip: without
    `direction` the common direction is fitted once on `fit_prompts` (default: data.path, the training prompts)
    and saved as <output_dir>/reward_direction.safetensors, which every process and every resume loads."""
    fit_max_prompts: int = 10000
    """decomposed-clip: fit the common direction on at most this many of the fit prompts, a sample drawn with the
    run's seed (0: every prompt). A mean of unit vectors is settled long before that (its error shrinks as
    1/√n), while LongAlign's 2M captions took the main process hours to encode, the other processes waiting."""
    loss_scale: float = 1.0
    """loss = -loss_scale · mean(reward). LongAlign's 0.5·(1 - mean S_ω) - const has the gradient of 0.5: use
    0.5 to reproduce its gradient norms under its clip of 0.3 (AdamW itself hardly sees the scale)."""
    num_steps: int = 50
    """DDIM steps of the sampling chain."""
    guidance_scale: float = 7.5
    """Classifier-free guidance in the chain (against the empty prompt, in the run's text encoding)."""
    grad_mode: str = "strided"
    """Which steps carry gradients (t2i_align.rollout.choose_grad_steps): "strided" (LongAlign: one offset, every
    num_steps/grad_k-th step), "stratified", "last" (DRaFT-K / ReFL-like) or "all" (AlignProp); DRaFT and AlignProp
    keep the gradient through the UNet's input: with them, set detach_input false."""
    grad_k: int = 5
    """How many gradient steps ("all" ignores it)."""
    detach_input: bool = True
    """Detach the UNet's input on gradient steps (LongAlign): gradients flow through the DDIM updates only."""
    checkpoint: bool = True
    """Recompute the UNet of gradient steps in backward (memory nearly flat in grad_k)."""
    decode_checkpoint: bool = True
    """Recompute the VAE decoder in backward."""
    eta: float = 0.0
    """DDIM η in [0, 1] (0: deterministic, as LongAlign; 1: DDPM-like noise; above 1 the step's
    sqrt(1 - ᾱ_prev - σ²) is of a negative number: NaN latents)."""
    x0_prediction: bool = True
    """Decode the last step's x0-prediction (LongAlign's code) instead of the final latents."""
    timestep_spacing: Optional[str] = "trailing"
    """DDIM timestep spacing of the chain: "trailing" gives LongAlign's 999 … 19 for 50 steps; null keeps the
    model's scheduler config (SD1.5 and the toy: "leading", 981 … 1, what their samplers use)."""
    kl_weight: float = 0.0
    """> 0 adds kl_weight · mean over gradient steps of ‖ε_θ(x_t) − ε_ref(x_t)‖² (mean over elements; guided
    predictions, the reference = the model the run started from, at the same x_t): DPOK's KL regulariser
    (Fan et al. 2023, arXiv 2305.16381, §4.2). 0: none, as LongAlign (no reference is built)."""

    def __post_init__(self) -> None:
        _check(self, "reward", bool(self.reward), "a reward name, e.g. decomposed-clip")
        _check(self, "loss_scale", self.loss_scale > 0, "a number > 0")
        _check_at_least(self, ("num_steps", "grad_k"), 1)
        _check(self, "guidance_scale", self.guidance_scale >= 0, "a number >= 0")
        _check_choice(self, "grad_mode", GRAD_MODES)
        _check(self, "grad_k", self.grad_mode == "all" or self.grad_k <= self.num_steps,
               f"at most num_steps ({self.num_steps})")
        _check(self, "grad_k", self.grad_mode != "strided" or self.num_steps % self.grad_k == 0,
               f"a divisor of num_steps ({self.num_steps}) with grad_mode strided (or use stratified)")
        _check(self, "eta", 0 <= self.eta <= 1, "a number in [0, 1] (DDIM's η; above 1 its step gives NaN)")
        _check(self, "kl_weight", self.kl_weight >= 0, "a number >= 0 (0: no KL regulariser)")
        _check(self, "fit_max_prompts", self.fit_max_prompts >= 0, "a count >= 0 (0: every fit prompt)")
        _check(self, "timestep_spacing", self.timestep_spacing is None or self.timestep_spacing in SPACINGS,
               "null or one of " + ", ".join(SPACINGS))
