"""Task-prompt ids shared by data, model and evaluation (spec §2.2).

0 means "unspecified": the frozen zero vector, so a model asked for task 0 behaves as SAM.
"""

TASK_IDS: dict[str, int] = {"unspecified": 0, "salient": 1, "entity": 2, "part": 3}
TASK_NAMES: dict[int, str] = {v: k for k, v in TASK_IDS.items()}


def task_id(name_or_id: str | int) -> int:
    """Return the integer task id for a task name (``"salient"``) or id (``1``).

    Raises:
        ValueError: naming the value and the known tasks when it is neither.
    """
    if isinstance(name_or_id, bool):
        raise ValueError(f"task {name_or_id!r}: expected one of {sorted(TASK_IDS)} or 0-3")
    if isinstance(name_or_id, int):
        if name_or_id in TASK_NAMES:
            return name_or_id
    elif isinstance(name_or_id, str) and name_or_id in TASK_IDS:
        return TASK_IDS[name_or_id]
    raise ValueError(f"task {name_or_id!r}: expected one of {sorted(TASK_IDS)} or 0-3")
