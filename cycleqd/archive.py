"""MAP-Elites archives, one per skill (CycleQD section 3). Pure numpy, no I/O.

In the archive of skill k, a model's quality is its score on k and its cell is the tuple of
the bins of its scores on every other skill, in config order. Without the cycle (the
paper's single-objective ablation, `objective: mean`) there is one archive, `mean`: quality
the mean of every skill's score, cell the bins of every skill.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from cycleqd.config import CampaignConfig, SamplingConfig, SkillConfig
from cycleqd.errors import CycleQDError
from cycleqd.sampling import SAMPLING

Cell = tuple[int, ...]


class ArchiveError(CycleQDError):
    """Archive contents (read back from a snapshot) are malformed."""


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return _is_int(value) or isinstance(value, float)


def bin_index(value: float, lo: float, hi: float, n_bins: int) -> int:
    """The bin of a BC value: exactly the paper's `digitize(x, linspace(lo, hi, n+1), right=True)
    - 1`, clipped to [0, n-1] so that values outside the range land in the edge bins."""
    if not math.isfinite(value):
        raise ValueError(f"cannot bin a non-finite score ({value})")
    edges = np.linspace(lo, hi, n_bins + 1)
    return int(np.clip(np.digitize(value, edges, right=True) - 1, 0, n_bins - 1))


@dataclass
class Elite:
    genome_id: str
    quality: float
    scores: dict[str, float]
    sampled: int = 0


@dataclass
class Archive:
    """The archive of one quality skill over the BC skills' grid."""

    skill: str  # the quality skill, or the archive's name where `objective` is given
    bc_skills: list[SkillConfig]
    cells: dict[Cell, Elite] = field(default_factory=dict)
    objective: tuple[str, ...] = ()  # skills whose mean is the quality; () = (skill,)

    def quality_of(self, scores: Mapping[str, float]) -> float:
        if not self.objective:
            return float(scores[self.skill])
        return sum(float(scores[s]) for s in self.objective) / len(self.objective)

    def cell_of(self, scores: Mapping[str, float]) -> Cell:
        return tuple(bin_index(scores[s.name], s.bc_min, s.bc_max, s.bins) for s in self.bc_skills)

    def offer(self, genome_id: str, scores: Mapping[str, float]) -> bool:
        """Keep the candidate if its cell is empty or it is strictly better there.
        A non-finite score (quality or BC) never enters: NaN would sit in a cell forever."""
        if not all(math.isfinite(float(v)) for v in scores.values()):
            return False
        quality = self.quality_of(scores)
        cell = self.cell_of(scores)
        incumbent = self.cells.get(cell)
        if incumbent is not None and not quality > incumbent.quality:
            return False
        self.cells[cell] = Elite(genome_id, quality, {k: float(v) for k, v in scores.items()})
        return True

    def best(self) -> Elite:
        if not self.cells:
            raise ValueError(f"archive {self.skill!r} is empty: seed it with the experts first")
        # Ties go to the lowest cell so that the choice never depends on insertion order.
        return max(sorted(self.cells.items()), key=lambda item: item[1].quality)[1]

    def fill(self) -> float:
        return len(self.cells) / math.prod(s.bins for s in self.bc_skills)

    def grid(self) -> np.ndarray:
        """Qualities as a dense array (NaN where empty), for elite maps."""
        out = np.full([s.bins for s in self.bc_skills], np.nan)
        for cell, elite in self.cells.items():
            out[cell] = elite.quality
        return out


MEAN_ARCHIVE = "mean"


def archive_names(config: CampaignConfig) -> list[str]:
    """The archives of a campaign, in the order generations breed for them."""
    return ArchiveSet.for_config(config).names


class ArchiveSet:
    """All archives (K with the cycle, one without); a candidate is offered to each.
    `skill_names`: the skills every candidate is scored on; `names`: the archives, in the
    order generations take them as their quality."""

    def __init__(self, skills: Sequence[SkillConfig], objective: str = "cycle"):
        self.skill_names = [s.name for s in skills]
        if objective == "mean":
            everything = tuple(self.skill_names)
            self.archives = {
                MEAN_ARCHIVE: Archive(MEAN_ARCHIVE, list(skills), objective=everything)
            }
        else:
            self.archives = {
                s.name: Archive(s.name, [b for b in skills if b.name != s.name]) for s in skills
            }
        self.names = list(self.archives)

    @classmethod
    def for_config(cls, config: CampaignConfig) -> ArchiveSet:
        return cls(config.skills, config.objective)

    def bred_for(self, generation: int) -> str:
        """The archive whose quality generation `generation` breeds for (the cycle)."""
        return self.names[generation % len(self.names)]

    def __getitem__(self, skill: str) -> Archive:
        return self.archives[skill]

    def offer(self, genome_id: str, scores: Mapping[str, float]) -> list[str]:
        """Insert wherever the candidate wins its cell; returns the skills it entered.

        A candidate with a missing or non-finite score is rejected outright: it enters nowhere.
        """
        missing = [s for s in self.skill_names if s not in scores]
        if missing:
            raise ValueError(f"scores of {genome_id} lack skill(s) {missing}")
        if not all(math.isfinite(float(scores[s])) for s in self.skill_names):
            return []
        return [name for name in self.names if self.archives[name].offer(genome_id, scores)]

    def genome_ids(self) -> set[str]:
        return {e.genome_id for a in self.archives.values() for e in a.cells.values()}

    def scores_of(self, genome_id: str) -> dict[str, float] | None:
        """An elite's scores on every skill, from whichever archive holds it."""
        for archive in self.archives.values():
            for elite in archive.cells.values():
                if elite.genome_id == genome_id:
                    return elite.scores
        return None

    def to_dict(self) -> dict:
        return {
            skill: [
                {"cell": list(cell), **asdict(elite)} for cell, elite in sorted(a.cells.items())
            ]
            for skill, a in self.archives.items()
        }

    def load_dict(self, data: Mapping[str, list[dict]]) -> None:
        """Replace the archives' contents with `to_dict`'s output; ArchiveError (and nothing
        is changed) if it is malformed or does not fit these archives' skills and bins."""
        if not isinstance(data, Mapping):
            raise ArchiveError(f"archives must be a mapping of skills, got {type(data).__name__}")
        unknown = sorted(str(s) for s in data if s not in self.archives)
        missing = [s for s in self.names if s not in data]
        if unknown or missing:
            raise ArchiveError(
                f"archives are named {sorted(map(str, data))}; this campaign's archives are "
                f"{self.names}"
            )
        loaded = {name: self._load_entries(name, data[name]) for name in self.names}
        for skill, cells in loaded.items():
            self.archives[skill].cells = cells

    def _load_entries(self, skill: str, entries: object) -> dict[Cell, Elite]:
        archive = self.archives[skill]
        if not isinstance(entries, list):
            raise ArchiveError(f"archive {skill!r}: expected a list of elites")
        cells: dict[Cell, Elite] = {}
        for i, e in enumerate(entries):
            where = f"archive {skill!r}, elite {i}"
            if not isinstance(e, Mapping) or set(e) != {
                "cell",
                "genome_id",
                "quality",
                "scores",
                "sampled",
            }:
                raise ArchiveError(
                    f"{where}: expected the fields cell, genome_id, quality, scores, sampled"
                )
            scores = e["scores"]
            if not isinstance(e["genome_id"], str) or not e["genome_id"]:
                raise ArchiveError(f"{where}: genome_id must be a non-empty string")
            if not isinstance(scores, Mapping) or set(scores) != set(self.skill_names):
                raise ArchiveError(f"{where}: scores must name exactly {self.skill_names}")
            values = [e["quality"], *scores.values()]
            if not all(_is_real(v) and math.isfinite(v) for v in values):
                raise ArchiveError(f"{where}: quality and scores must be finite numbers")
            if e["quality"] != archive.quality_of(scores):
                raise ArchiveError(f"{where}: quality is not its {skill!r} score")
            if not (_is_int(e["sampled"]) and e["sampled"] >= 0):
                raise ArchiveError(f"{where}: sampled must be a count")
            cell = e["cell"]
            if not isinstance(cell, list) or not all(_is_int(c) for c in cell):
                raise ArchiveError(f"{where}: cell must be a list of bin numbers")
            if tuple(cell) != archive.cell_of(scores):
                raise ArchiveError(
                    f"{where}: cell {cell} is not the cell of its scores "
                    f"{list(archive.cell_of(scores))}"
                )
            if tuple(cell) in cells:
                raise ArchiveError(f"{where}: cell {cell} holds two elites")
            cells[tuple(cell)] = Elite(
                e["genome_id"],
                float(e["quality"]),
                {k: float(v) for k, v in scores.items()},
                e["sampled"],
            )
        return cells

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ArchiveSet) and self.to_dict() == other.to_dict()


def sampling_probabilities(
    archive: Archive, sampling: SamplingConfig
) -> tuple[list[Cell], np.ndarray]:
    """Per-elite parent probabilities, cells in sorted order (see `cycleqd.sampling`)."""
    return SAMPLING[sampling.method].probabilities(archive, sampling)


def sample_parents(
    archives: ArchiveSet,
    skill: str,
    sampling: SamplingConfig,
    rng: np.random.Generator,
    fallback: Sequence[str] = (),
) -> tuple[str, str]:
    """Two distinct parents from the archive of `skill`.

    An archive with a single elite (possible right after seeding, when experts share a cell)
    borrows its second parent uniformly from the other archives' elites, or, when every
    archive holds that one model (experts that all score alike), from `fallback` (the experts).
    """
    archive = archives[skill]
    cells, probs = sampling_probabilities(archive, sampling)
    if len(cells) >= 2:
        picked = rng.choice(len(cells), size=2, replace=False, p=probs)
        parents = [archive.cells[cells[i]] for i in picked]
        for elite in parents:
            elite.sampled += 1
        return parents[0].genome_id, parents[1].genome_id
    if not cells:
        raise ValueError(f"archive {skill!r} is empty: seed the archives with the experts first")
    first = archive.cells[cells[0]].genome_id
    others = sorted(archives.genome_ids() - {first}) or sorted(set(fallback) - {first})
    if not others:
        raise ValueError("all archives hold one single model; CycleQD needs two distinct parents")
    archive.cells[cells[0]].sampled += 1
    return first, others[int(rng.integers(len(others)))]
