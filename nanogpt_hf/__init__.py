"""nanogpt_hf: nanoGPT as a first-class Hugging Face citizen.

Importing the package registers model_type "nanogpt" with the transformers Auto classes, and marks the model for
`register_for_auto_class`, so every `save_pretrained` / `push_to_hub` writes `auto_map` and the two source files
that let `AutoModelForCausalLM.from_pretrained(dir_or_id, trust_remote_code=True)` work without this package.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_nanogpt import NanoGPTConfig
from .modeling_nanogpt import NanoGPTForCausalLM, NanoGPTModel, NanoGPTPreTrainedModel, peak_flops

__version__ = "0.1.0"

AutoConfig.register("nanogpt", NanoGPTConfig, exist_ok=True)
AutoModel.register(NanoGPTConfig, NanoGPTModel, exist_ok=True)
AutoModelForCausalLM.register(NanoGPTConfig, NanoGPTForCausalLM, exist_ok=True)
NanoGPTConfig.register_for_auto_class()
NanoGPTModel.register_for_auto_class("AutoModel")
NanoGPTForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["NanoGPTConfig", "NanoGPTModel", "NanoGPTForCausalLM", "NanoGPTPreTrainedModel", "peak_flops"]
