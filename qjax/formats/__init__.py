"""Reading and writing models: qjax directories, GGUF, and opening any model by name."""

from qjax.formats.loading import LoadedModel as LoadedModel
from qjax.formats.loading import load_model as load_model
from qjax.formats.loading import open_checkpoint as open_checkpoint

__all__ = ["LoadedModel", "load_model", "open_checkpoint"]
