"""What `sampling.load_pipeline` hands `DiffusionPipeline.from_pretrained` and checks of what it loaded, as
training's `models.load_components` checks its parts: the tokenizers' context, and which parts come from elsewhere
(a `--vae`, no safety checker)."""
from __future__ import annotations

from pathlib import Path

from .model_folders import ModelLoadError, read_index


def check_tokenizer(folder: Path, tokenizer, encoder) -> None:
    """A tokenizer_config.json without model_max_length gives 1e30 (an OverflowError at the first prompt). An
    encoder without a fixed context (T5's relative positions) or a tokenizer without a length: not this check's."""
    positions = getattr(encoder.config, "max_position_embeddings", None)
    length = getattr(tokenizer, "model_max_length", None)
    if positions is None or length is None:
        return
    if not 0 < length <= positions:
        raise ModelLoadError(f"{folder}: the tokenizer's model_max_length {length:g} does not fit "
                             f"the text encoder's {positions} positions: its tokenizer_config.json is missing or "
                             "damaged; copy the folder again")


def check_pipeline_tokenizers(pipe, path: Path) -> None:
    """`check_tokenizer` for each tokenizer of a loaded pipeline (diffusers loads a 1e30 context without a word, and
    sampling failed with an OverflowError traceback at the first prompt)."""
    for tok, enc in (("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")):
        tokenizer, encoder = getattr(pipe, tok, None), getattr(pipe, enc, None)
        if tokenizer is not None and encoder is not None:
            check_tokenizer(Path(path) / tok, tokenizer, encoder)


def given_parts(path: Path, vae=None) -> dict:
    """from_pretrained's arguments for the parts not loaded from folder `path`: `vae` (a loaded `--vae`, so the
    folder's own vae/ is not read: a base without one samples as it trained with model.vae), and no safety checker
    for a folder whose model_index.json lists one (SD1.5's: 1.2 GB loaded for nothing, and a folder that left it
    out would not load)."""
    parts: dict = {} if vae is None else {"vae": vae}
    if "safety_checker" in read_index(path):
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    return parts


def check_listed_parts(path: Path, spec, vae_given: bool = False) -> None:
    """Each part family `spec` trains with is listed in model_index.json: an SDXL folder saved with
    text_encoder_2=None passed the dry run and failed after the first text encoder had loaded."""
    index = read_index(path)
    needed = [name for pair in spec.text_components for name in pair] + ["unet", "scheduler"]
    needed += [] if vae_given else ["vae"]
    for name in needed:
        entry = index.get(name)
        if not isinstance(entry, list) or not entry or entry[0] is None:
            other = " (or decode with another VAE: model.vae=DIR)" if name == "vae" else ""
            raise ModelLoadError(f"{path}/model_index.json lists no {name} ({'null' if name in index else 'absent'})"
                                 f", which the {spec.name} family needs: the folder was saved without it or is "
                                 f"incomplete; give a complete {spec.name} pipeline folder{other}")
