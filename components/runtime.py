"""The container image each kind of component runs in, from the one place images are defined."""

from __future__ import annotations

from cycleqd_kfp.images.images import image_for

CPU_IMAGE = image_for("cpu-tools")  # preflight, seed, breed, commit, export, release
EVALUATOR_IMAGE = image_for("evaluator")  # materialise + score a child on a GPU
TRAINER_IMAGE = image_for("trainer")  # expert fine-tuning
