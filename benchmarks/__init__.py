"""The speed suite: each hot path of the pipeline timed against its reference implementation in
the same run, on the same weights and inputs, with a check that both computed the same thing.

``python -m benchmarks`` runs it (`benchmarks.__main__`); one module per benchmark:

- `benchmarks.encoder`: the official fp32 image encoder vs the fast path the pipeline uses;
- `benchmarks.pseudolabel`: ``SamAutomaticMaskGenerator`` vs `sum.pseudo.amg.MaskGenerator`;
- `benchmarks.train_step`: a plain fp32 training loop vs the step ``finetune`` runs;
- `benchmarks.interactive`: ``SamPredictor`` re-prompted per click vs `sum.eval.scoring.run_protocol`.

`benchmarks.common` holds what they share (models, timing, the machine's description).
``benchmarks/device_check.sh`` runs the GPU tests and the suite on a lent GPU machine.
This package imports nothing heavy at import time, so that ``__main__`` can set the thread
counts before torch loads.
"""

BENCHMARKS = ("encoder", "pseudolabel", "interactive", "train_step")  # in the order they run
