"""The mask generator's settings as the pseudolabel stage reads them from its config: one place
that both the stage (`sum.pseudo.run`) and the benchmarks use, with no distributed engine
imported (the GPU machine's benchmark run has no Dask)."""

from __future__ import annotations

import inspect
from typing import Any, Dict

from sum.pseudo.amg import MaskGenerator

# MaskGenerator arguments that are not settings of the stage
NOT_AMG = {"self", "model", "point_grids", "output_mode", "task_prompt"}


def amg_params(pcfg) -> Dict[str, Any]:
    """The `MaskGenerator` keyword arguments: every one ``pcfg`` sets, the generator's own default
    for the rest (so that a changed default in `sum.pseudo.amg` also changes `config_hash`)."""
    params = {}
    for name, p in inspect.signature(MaskGenerator.__init__).parameters.items():
        if name in NOT_AMG or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value = getattr(pcfg, name, p.default)
        params[name] = value
    return params
