"""Calibration: text and token windows, input statistics, the blockwise runner, and the transforms that run blocks."""

from qjax.calib.awq import ScaleGroup as ScaleGroup
from qjax.calib.awq import awq as awq
from qjax.calib.lwc import learned_clipping as learned_clipping
from qjax.calib.runner import BlockModel as BlockModel
from qjax.calib.runner import RunnerOptions as RunnerOptions
from qjax.calib.runner import quantize_blocks as quantize_blocks

__all__ = ["BlockModel", "RunnerOptions", "ScaleGroup", "awq", "learned_clipping", "quantize_blocks"]
