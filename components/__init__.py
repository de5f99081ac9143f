"""Kubeflow Pipelines components, one folder per CycleQD stage (installed as
`cycleqd_kfp.components`). Each only parses its inputs, calls `cycleqd.steps` and writes
small outputs: JSON pointers, Metrics and HTML elite maps for the UI. Never weights."""
