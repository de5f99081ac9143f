"""The tiny skill world: three execution-verified skills (Python expressions, SQLite queries,
shell pipelines) small enough for a ~1.3M-parameter Llama to learn on a CPU in minutes.

- `tasks`: seeded generators of (question, reference answer), disjoint train/eval splits;
- `execute`: where answers run (the project's sandbox, or a limited subprocess) and the checks
  they pass first; SQL in a read-only in-memory SQLite;
- `skill`: `TinySkill` (the `Skill` protocol) and `TinyWorldEvaluator` (the campaign's
  `Evaluator`);
- `data`: chat-format training sets (per skill, and the mixed "general" set of the base);
- `train`: a minimal trainer, the tiny world's base and experts, and the feasibility report
  (`python -m cycleqd.skills.tiny.train`).
"""

from cycleqd.skills.tiny.execute import TinyExecutor, open_executor
from cycleqd.skills.tiny.skill import TinySkill, TinyWorldEvaluator, extract_answer
from cycleqd.skills.tiny.tasks import FAMILIES, TinySample, generate

__all__ = [
    "FAMILIES",
    "TinyExecutor",
    "TinySample",
    "TinySkill",
    "TinyWorldEvaluator",
    "extract_answer",
    "generate",
    "open_executor",
]
