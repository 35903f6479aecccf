"""Names the evaluation's outputs share (spec §10): the column suffixes of the model variants, the
NoC / NoF scores and their IoU thresholds, the rounds reported and the NoC click budget. Kept free
of the data and model code, so that reading ``metrics/eval.json`` (`sum.eval.report`, the
``register`` stage) does not depend on them.
"""

from __future__ import annotations

from typing import List

TP0_SUFFIX = "@tp0"  # <model>@tp0: task prompt 0 in every round (spec §13 A3)
PIOU_SUFFIX = "@piou"  # <model>@piou: predicted-IoU selection (what an interactive tool shows)
NOC_THRESHOLDS = {"noc85": 0.85, "noc90": 0.90, "noc95": 0.95}  # mean clicks to reach the IoU
NOF_THRESHOLDS = {"nof95": 0.95}  # objects that do not reach the IoU within the budget
# the part task split by the scale rule (sum.eval.protocol.target_scale): key -> (row label, MaskRecord.resolvable)
PART_SPLIT = {"resolvable": ("part (resolvable)", True), "sub_resolution": ("part (sub-resolution)", False)}


def report_rounds(rounds: int) -> List[int]:
    """The rounds reported in the JSON and the table: 1, 3, 5 and the last (those that exist)."""
    return sorted({1, min(3, rounds), min(5, rounds), rounds})


def noc_budget(ev) -> int:
    """Clicks of the NoC / NoF budget (RITM's 20): ``eval.noc_max_clicks``, or ``eval.rounds`` when 0."""
    return ev.noc_max_clicks or ev.rounds
