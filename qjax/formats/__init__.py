"""Reading and writing models: qjax directories, GPTQ and AWQ checkpoints, GGUF, and opening any model by name."""

from qjax.formats.awq import load_awq as load_awq
from qjax.formats.awq import save_awq as save_awq
from qjax.formats.convert import convert_model as convert_model
from qjax.formats.convert import convert_params as convert_params
from qjax.formats.gptq import load_gptq as load_gptq
from qjax.formats.gptq import save_gptq as save_gptq
from qjax.formats.loading import LoadedModel as LoadedModel
from qjax.formats.loading import load_model as load_model
from qjax.formats.loading import open_checkpoint as open_checkpoint

__all__ = [
  "LoadedModel",
  "convert_model",
  "convert_params",
  "load_awq",
  "load_gptq",
  "load_model",
  "open_checkpoint",
  "save_awq",
  "save_gptq",
]
