"""The Llama family in Flax, checkpoint readers, the built-in default model, generation."""

from qjax.models.checkpoint import Checkpoint as Checkpoint
from qjax.models.checkpoint import GgufCheckpoint as GgufCheckpoint
from qjax.models.checkpoint import SafetensorsCheckpoint as SafetensorsCheckpoint
from qjax.models.config import LlamaConfig as LlamaConfig
from qjax.models.config import RopeScaling as RopeScaling
from qjax.models.default import default_gguf_path as default_gguf_path
from qjax.models.default import default_model_dir as default_model_dir
from qjax.models.generate import generate as generate
from qjax.models.llama import DecoderLayer as DecoderLayer
from qjax.models.llama import KVCache as KVCache
from qjax.models.llama import LlamaForCausalLM as LlamaForCausalLM
from qjax.models.llama import init_caches as init_caches

__all__ = [
  "Checkpoint",
  "DecoderLayer",
  "GgufCheckpoint",
  "KVCache",
  "LlamaConfig",
  "LlamaForCausalLM",
  "RopeScaling",
  "SafetensorsCheckpoint",
  "default_gguf_path",
  "default_model_dir",
  "generate",
  "init_caches",
]
