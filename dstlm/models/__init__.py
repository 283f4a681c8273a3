from dstlm.models.gpt import GPT, GPTConfig
from dstlm.models.presets import available_presets, load_preset

__all__ = ["GPT", "GPTConfig", "available_presets", "load_preset"]
