"""Reading and writing models: every format's exporter and importer, one target parser, opening any model by name."""

from qjax.formats.awq import load_awq as load_awq
from qjax.formats.awq import save_awq as save_awq
from qjax.formats.convert import convert_model as convert_model
from qjax.formats.convert import convert_params as convert_params
from qjax.formats.default_model import default_model_dir as default_model_dir
from qjax.formats.gguf import write_gguf as write_gguf
from qjax.formats.gguf_reader import GgufCheckpoint as GgufCheckpoint
from qjax.formats.gptq import load_gptq as load_gptq
from qjax.formats.gptq import save_gptq as save_gptq
from qjax.formats.loading import LoadedModel as LoadedModel
from qjax.formats.loading import load_model as load_model
from qjax.formats.loading import open_checkpoint as open_checkpoint
from qjax.formats.native import load_quantized as load_quantized
from qjax.formats.native import save_quantized as save_quantized
from qjax.formats.targets import Target as Target
from qjax.formats.targets import export as export
from qjax.formats.targets import parse_target as parse_target

__all__ = [
  "GgufCheckpoint",
  "LoadedModel",
  "Target",
  "convert_model",
  "convert_params",
  "default_model_dir",
  "export",
  "load_awq",
  "load_gptq",
  "load_model",
  "load_quantized",
  "open_checkpoint",
  "parse_target",
  "save_awq",
  "save_gptq",
  "save_quantized",
  "write_gguf",
]
