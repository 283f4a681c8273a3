"""Named model presets: each is a YAML fragment in configs/model/<name>.yaml."""

from __future__ import annotations

import yaml

from dstlm.models.gpt import GPTConfig
from dstlm.paths import configs_dir


def available_presets() -> list[str]:
    return sorted(p.stem for p in (configs_dir() / "model").glob("*.yaml"))


def load_preset(name: str, **overrides) -> GPTConfig:
    """GPTConfig of the preset `name`, with keyword overrides (e.g. n_layer=2)."""
    path = configs_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"unknown model preset {name!r}; choose one of: {', '.join(available_presets())}")
    values = yaml.safe_load(path.read_text()) or {}
    values.update(overrides)
    return GPTConfig(**values)
