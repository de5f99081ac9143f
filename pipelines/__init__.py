"""Compiled Kubeflow pipelines (installed as `cycleqd_kfp.pipelines`): wiring only."""
