"""The file ``log_model`` ships as the model's code (MLflow's models from code): it names the
pyfunc class, so nothing is pickled. Loading it needs the ``sum`` package, which the logged
model carries in its ``code/`` folder."""

import mlflow

from sum.registry.pyfunc import SumPyfunc

mlflow.models.set_model(SumPyfunc())
