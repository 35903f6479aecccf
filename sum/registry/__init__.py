"""The MLflow model registry: what users pull (``models:/<name>@champion``) and serve.

- `sum.registry.gate`: the no-forgetting champion gate, a pure function of the evaluation.
- `sum.registry.pyfunc`: the SUM model as an MLflow pyfunc (requests, responses, embedding LRU).
- `sum.registry.register`: the ``register`` stage: log, register, judge, set aliases.
- `sum.registry.pull`: a registered version's checkpoint back on disk, as SUM or plain SAM.
"""
