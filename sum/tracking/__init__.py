"""MLflow tracking: runs of stages and of training (`sum.tracking.runs`), and the one parent run per
pipeline run that they share (`sum.tracking.pipeline`). Conventions: `sum.tracking.runs`'s docstring.
MLflow is imported inside the functions that use it: it costs seconds, and tracking may be off."""

from sum.tracking.pipeline import (
    PIPELINE_KEY_TAG,
    PIPELINE_RUN_FILE,
    PipelineParent,
    dvc_lineage,
    pipeline_key,
    pipeline_parent,
    recorded_parent,
)
from sum.tracking.runs import (
    DEFAULT_TRACKING_URI,
    EVAL_MD5_TAG,
    FLOW_RUN_ENV,
    FLOW_RUN_TAG,
    GIT_COMMIT_TAG,
    MODEL_MD5_TAG,
    PARENT_RUN_TAG,
    NullTracker,
    RunTracker,
    flatten,
    git_commit,
    global_tracking_uri,
    json_metrics,
    stage_run,
    start_run,
    tracking_uri,
)
