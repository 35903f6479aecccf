"""One progress bar for every stage: tqdm on a terminal, silent in logs and on ranks other than 0."""

from __future__ import annotations

from tqdm.auto import tqdm


def progress_bar(total: int | None, desc: str, unit: str = "it", initial: int = 0, enabled: bool = True,
                 **options) -> tqdm:
    """A tqdm bar over ``total`` units named ``desc``.

    Arguments:
      total: the number of units (None: unknown).
      desc: the label, usually the stage and what it counts over ("embed world", "finetune").
      unit: the unit's name ("img", "step", "B").
      initial: units already done (a resumed run).
      enabled: False turns the bar off whatever the terminal (e.g. every rank but 0 under torchrun);
        True shows it only where tqdm sees a terminal (``disable=None``).
      options: passed to tqdm (``unit_scale``, ``leave`` ...).
    """
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=None if enabled else True, **options)
