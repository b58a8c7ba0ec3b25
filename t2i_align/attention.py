"""SDPA held to one kernel: `model.attention=sdpa-flash|sdpa-efficient|sdpa-cudnn|sdpa-math`.

Plain `sdpa` lets PyTorch pick a kernel per call; pinning one is how to measure what each kernel costs (issue 14's
levers) or to rule one out. Everything else is diffusers' own `AttnProcessor2_0`.
"""
from __future__ import annotations

from diffusers.models.attention_processor import AttnProcessor2_0
from torch.nn.attention import SDPBackend, sdpa_kernel

from .errors import UserError

KERNELS = {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
           "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH}

NO_KERNEL = ("No available kernel", "No viable backend")
"""How PyTorch says that no allowed SDPA kernel fits the inputs (older and newer wording)."""


class AttentionKernelError(UserError, RuntimeError):
    """The pinned SDPA kernel cannot run these inputs (device, dtype or head size)."""


class PinnedSDPAProcessor(AttnProcessor2_0):
    """diffusers' SDPA processor with `scaled_dot_product_attention` held to one kernel."""

    def __init__(self, setting: str):
        super().__init__()
        self.setting, self.kernel = setting, KERNELS[setting]

    def __call__(self, *args, **kwargs):
        with sdpa_kernel([self.kernel]):
            try:
                return super().__call__(*args, **kwargs)
            except RuntimeError as err:
                if not any(words in str(err) for words in NO_KERNEL):
                    raise
                raise AttentionKernelError(
                    f"model.attention={self.setting}: PyTorch's {self.kernel.name} kernel cannot run this "
                    "attention here (efficient and cudnn need CUDA; on a GPU flash and cudnn need fp16/bf16 inputs, "
                    "i.e. train.mixed_precision=fp16 or bf16, and each kernel supports only some head sizes); use "
                    "model.attention=sdpa to let PyTorch choose") from err
