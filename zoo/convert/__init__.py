"""PyTorch CLIP weights <-> zoo: open_clip / OpenAI and Hugging Face transformers layouts.

`from_open_clip(state_dict, name)`, `to_open_clip(model)`, `from_hf(state_dict, name_or_config)`,
`to_hf(model)`; `python -m zoo.convert --help` for the command line (safetensors in and out).
Conversions are pure re-layouts (exact), and every input is checked: a state dict that does not
fit raises one `StateDictError` counting the missing, unexpected and mis-shaped keys.
"""

from zoo.convert.common import StateDictError
from zoo.convert.hf import config_from_hf, config_to_hf, from_hf, to_hf
from zoo.convert.llm import load_pretrained as load_hf_llm
from zoo.convert.open_clip import config_from_open_clip, from_open_clip, to_open_clip

__all__ = [
    "StateDictError",
    "config_from_hf",
    "config_from_open_clip",
    "config_to_hf",
    "from_hf",
    "from_open_clip",
    "load_hf_llm",
    "to_hf",
    "to_open_clip",
]
