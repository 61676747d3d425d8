"""The Llama family in Flax: the model, its parts for calibration, Hugging Face checkpoints, generation."""

from qjax.models.blocks import LlamaBlocks as LlamaBlocks
from qjax.models.checkpoint import Checkpoint as Checkpoint
from qjax.models.checkpoint import SafetensorsCheckpoint as SafetensorsCheckpoint
from qjax.models.config import LlamaConfig as LlamaConfig
from qjax.models.config import RopeScaling as RopeScaling
from qjax.models.generate import generate as generate
from qjax.models.llama import DecoderLayer as DecoderLayer
from qjax.models.llama import KVCache as KVCache
from qjax.models.llama import LlamaForCausalLM as LlamaForCausalLM
from qjax.models.llama import init_caches as init_caches
from qjax.models.llama import logits_fn as logits_fn

__all__ = [
  "Checkpoint",
  "DecoderLayer",
  "KVCache",
  "LlamaBlocks",
  "LlamaConfig",
  "LlamaForCausalLM",
  "RopeScaling",
  "SafetensorsCheckpoint",
  "generate",
  "init_caches",
  "logits_fn",
]
