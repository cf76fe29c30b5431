"""loopcoder: Parallel Loop Transformer (LoopCoder-v2) code models.

Importing the package registers the model with transformers' Auto classes, for our model type and
the released one ("iquestpltcoder"), so `AutoModelForCausalLM.from_pretrained(dir)` loads a
LoopCoder-V2 directory as it is.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from loopcoder.cache import PLTCache
from loopcoder.config import MODEL_TYPE, ConfigError, PLTConfig
from loopcoder.model import IQuestPLTCoderForCausalLM, PLTForCausalLM, PLTModel

__version__ = "0.1.0"

AutoConfig.register(MODEL_TYPE, PLTConfig, exist_ok=True)
AutoModelForCausalLM.register(PLTConfig, PLTForCausalLM, exist_ok=True)

__all__ = [
    "ConfigError",
    "IQuestPLTCoderForCausalLM",
    "PLTCache",
    "PLTConfig",
    "PLTForCausalLM",
    "PLTModel",
]
