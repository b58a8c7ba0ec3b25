"""Prompt lists: a text file with one prompt per line, or a toy-world prompt set ("toy:train", "toy:heldout")."""
from __future__ import annotations

from pathlib import Path
from typing import List

from .config import ConfigError


def read_prompts(spec: str, what: str = "prompts") -> List[str]:
    """Prompts from `spec`; blank lines are skipped. `what` names the setting in error messages."""
    if spec.startswith("toy:"):
        from .toy.evaluate import prompt_set
        from .toy.scenes import short_caption

        try:
            return [short_caption(s) for s in prompt_set(spec[4:])]
        except ValueError as err:
            raise ConfigError(f"{what}: {err} (as toy:train or toy:heldout)") from None
    path = Path(spec)
    if not path.is_file():
        raise ConfigError(f"{what}: prompts file {path} not found; give a text file with one prompt per line "
                          "(or toy:train / toy:heldout for the toy world)")
    prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ConfigError(f"{what}: {path} holds no prompts; write one prompt per line")
    return prompts
