"""AWQ+GPTQ with AWQ's scale search on a bounded number of tokens, for CPU-sized experiments.

  qjax quantize --recipe=experiments/awq_gptq_cpu.py:recipe --export=gguf:Q4_K_M

The same recipe as ``--method=awq+gptq`` (AWQ's scales, no clipping, then GPTQ into the export's grids) except
that the scale search runs the block part on the first 4096 calibration tokens rather than all of them: it runs
the block part once per grid point (20 per scale group), which on two CPU cores costs several times GPTQ itself.
The activation statistics it scales by still cover every calibration token.
"""

import qjax

SEARCH_TOKENS = 4096


def recipe(spec: qjax.QSpec, gptq_rounding: qjax.Recipe) -> qjax.Recipe:
  """AWQ's scales searched on `SEARCH_TOKENS` tokens, then GPTQ (into a GGUF recipe's grids, or on `spec`)."""
  return qjax.Recipe((qjax.awq(spec, clip=False, search_tokens=SEARCH_TOKENS),), "awq") + gptq_rounding
