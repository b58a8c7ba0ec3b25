"""YAML's reading of text, both ways: a text setting as typed (YAML reads 0001 as 1, 1:30 as 90, yes as True,
and OmegaConf 1e3 as 1000.0) and a dumper quoting any text that would not read back as itself."""
from __future__ import annotations

from typing import Any, Dict, Iterator, List, Optional, Tuple

import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

NULLS = ("null", "Null", "NULL", "~", "")
"""Plain YAML scalars that mean null."""


def entries(node: Any, prefix: str = "") -> Iterator[Tuple[str, Any]]:
    """(dotted key, value node) of every mapping entry of a composed YAML file as YAML resolves it."""
    for name, value in _pairs(node):
        dotted = f"{prefix}{name}"
        yield dotted, value
        yield from entries(value, dotted + ".")


def _pairs(node: Any) -> List[Tuple[str, Any]]:
    """A mapping's (key, value node) pairs with merge keys (`<<: *defaults`, or a list of them) resolved as YAML
    does: a key given explicitly wins over a merged one, an earlier merge source over a later one, whole (a
    shallow merge)."""
    if not isinstance(node, yaml.MappingNode):
        return []
    own, merged = [], []
    for key, value in node.value:
        if key.tag == "tag:yaml.org,2002:merge":
            for source in value.value if isinstance(value, yaml.SequenceNode) else (value,):
                merged += _pairs(source)
        else:
            own.append((key.value, value))
    seen: set = set()
    return [(name, value) for name, value in own + merged if not (name in seen or seen.add(name))]


def as_typed(node: Any, loaded: Any) -> Any:
    """A plain (unquoted) scalar of a text setting as typed, else `loaded` (YAML's reading): YAML reads 0001 as 1,
    1:30 as 90 (base 60), yes as True and OmegaConf 1e3 as 1000.0, which became the texts "1", "90", "True",
    "1000.0". Items of a list of text likewise."""
    if isinstance(node, yaml.SequenceNode) and isinstance(loaded, list) and len(loaded) == len(node.value):
        return [as_typed(item, value) for item, value in zip(node.value, loaded)]
    plain = isinstance(node, yaml.ScalarNode) and node.style is None and node.value not in NULLS
    return node.value if plain and loaded is not None and not isinstance(loaded, str) else loaded


def retype(layer: DictConfig, key: str, node: Any, data: Optional[Dict] = None) -> None:
    """`key` of `layer` as its YAML `node` was typed (`as_typed`); `data`: the layer as a container."""
    loaded = OmegaConf.to_container(layer, resolve=False) if data is None else data
    for part in key.split("."):
        loaded = loaded.get(part) if isinstance(loaded, dict) else None
    typed = as_typed(node, loaded)
    if typed is not loaded:
        OmegaConf.update(layer, key, typed, merge=False)


class Dumper(yaml.SafeDumper):
    """Writes quoted the text "None" (bare, `load_config` refuses it for a setting that may be null) and any text
    OmegaConf's YAML would read as another value (PyYAML wrote 1234e56 bare, which came back as 1.234e+59)."""


def _represent_text(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    plain = yaml.dump({"k": text}, Dumper=yaml.SafeDumper)
    try:
        same = OmegaConf.to_container(OmegaConf.create(plain), resolve=False)["k"] == text
    except (yaml.YAMLError, OmegaConfBaseException):
        same = False
    quote = text in ("None", "none") or not same
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style="'" if quote else None)


Dumper.add_representer(str, _represent_text)
