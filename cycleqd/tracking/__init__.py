"""Tracking of campaigns (and of expert fine-tuning) in MLflow.

A campaign reports its events to a `Tracker` (`cycleqd.protocols`): `NullTracker` ignores
them, `MLflowTracker` records runs, lineage, elite maps and the registered final model (its
module doc shows the layout). The modules: `mlflow_tracker` (the campaign's MLflow layout),
`queue` (the retry queue that keeps tracking from ever stopping the search), `common` (what
every cycleqd MLflow tracker writes alike, shared with `cycleqd.finetune.tracking`) and
`null`. Import from this package; the modules are its layout, not its interface.
"""

from cycleqd.protocols import DatasetRef, Tracker
from cycleqd.tracking.common import (
    EXTERNAL_TAG,
    MAX_PARAM,
    MAX_TAG,
    T,
    clip,
    ensure_experiment,
    flatten,
    genome_params,
    http_settings,
    mlflow_dataset,
    now_ms,
    resolve_tracking_uri,
    system_tags,
)
from cycleqd.tracking.mlflow_tracker import Attach, MLflowTracker
from cycleqd.tracking.null import NullTracker
from cycleqd.tracking.queue import Missed

__all__ = [
    "EXTERNAL_TAG",
    "MAX_PARAM",
    "MAX_TAG",
    "Attach",
    "DatasetRef",
    "MLflowTracker",
    "Missed",
    "NullTracker",
    "T",
    "Tracker",
    "clip",
    "ensure_experiment",
    "flatten",
    "genome_params",
    "http_settings",
    "mlflow_dataset",
    "now_ms",
    "resolve_tracking_uri",
    "system_tags",
]
