"""The container image each kind of component runs in, from the one place images are defined."""

from __future__ import annotations

from cycleqd_kfp.images.images import image_for

# Tasks that read no weights (the pipeline gives them no GPU, small requests): preflight, plan,
# breed, commit, release.
CPU_IMAGE = image_for("cpu-tools")
# Tasks that materialise and score models on a GPU: seed, evaluate, export (seed and export
# only where `plan` finds they have work to do).
EVALUATOR_IMAGE = image_for("evaluator")
TRAINER_IMAGE = image_for("trainer")  # finetune: one expert per task, on a GPU
