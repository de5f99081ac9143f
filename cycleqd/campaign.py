"""The CycleQD loop, in process: seed, then per generation breed -> materialise -> evaluate ->
insert, then aggregate. Kubeflow components call the same steps one at a time.

Randomness: generation t, child p draws from `default_rng([seed, t, p])`. Nothing random
is carried from one generation to the next, so a campaign resumed from its last snapshot
breeds exactly the children an uninterrupted run would have bred.
"""

from __future__ import annotations

import copy
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

import numpy as np

from cycleqd.archive import ArchiveSet, sample_parents
from cycleqd.config import CampaignConfig, FinalConfig
from cycleqd.crossovers import CROSSOVERS
from cycleqd.errors import CycleQDError, NonFiniteWeightsError
from cycleqd.final_methods import FINAL_METHODS
from cycleqd.genome import Genome, GenomeBook
from cycleqd.model_sources import ModelSource, Weights, open_models
from cycleqd.mutations import MUTATIONS
from cycleqd.objectstore import RemoteSafetensors, model_is_complete, read_manifest
from cycleqd.proposers import PROPOSERS, cell_inputs, fitness, tuned_options
from cycleqd.protocols import (  # Evaluator, ChildResult, Tensors: user code imports them here
    ChildResult,
    Evaluator,
    EvaluatorBase,
    Tensors,
    Tracker,
    as_evaluator,
)
from cycleqd.state import CampaignStore
from cycleqd.tracking import NullTracker
from cycleqd.weights import SafetensorsFolder

if TYPE_CHECKING:
    import torch

    from cycleqd.materialize import Materializer

log = logging.getLogger(__name__)


def breed(
    config: CampaignConfig,
    book: GenomeBook,
    archives: ArchiveSet,
    generation: int,
    learned: dict[str, list[float]] | None = None,
) -> list[Genome]:
    """The children of one generation, all bred from the archives as they stand.
    `learned`: the proposer's fitness history per skill (`cycleqd.proposers`)."""
    skill = archives.bred_for(generation)
    experts = book.expert_ids()
    crossover = CROSSOVERS[config.crossover.method]
    mutation = MUTATIONS[config.mutation.kind]
    proposer = PROPOSERS[config.proposer.kind]
    history = (learned or {}).get(skill, [])
    first_slot = proposer.batch_slot(config.proposer, history)
    tunable = (*crossover.tunable, *mutation.tunable)
    children = []
    for index in range(config.population):
        rng = np.random.default_rng([config.seed, generation, index])
        parents = sample_parents(archives, skill, config.sampling, rng, experts.values())
        crossing, mutating = config.crossover, config.mutation
        if proposer.learns:
            inputs = cell_inputs(archives[skill], [archives.scores_of(p) for p in parents])
            values = proposer.propose(
                config.proposer, history, first_slot + index, inputs, len(tunable)
            )
            if values is not None:
                split = len(crossover.tunable)
                crossing = tuned_options(crossing, crossover.tunable, values[:split])
                mutating = tuned_options(mutating, mutation.tunable, values[split:])
        weights = crossover.weights(crossing, rng, len(parents))
        seed = int(rng.integers(2**31))
        children.append(
            Genome(
                kind="child",
                parents=parents,
                weights=weights,
                mutation=mutation.recipe(mutating, seed, experts.get(skill, "")),
                skill=skill,
                generation=generation,
            )
        )
    return children


def final_genome(archives: ArchiveSet, final: FinalConfig | str = "merge_best") -> Genome:
    """The final model by the config's method (`cycleqd.final_methods`), or by a method's
    name with its default options."""
    options = FINAL_METHODS.options_of(final)() if isinstance(final, str) else final
    return FINAL_METHODS[options.method].genome(archives, options)


class Campaign:
    """A campaign bound to its store, its models and an evaluator."""

    def __init__(
        self,
        config: CampaignConfig,
        store: CampaignStore,
        evaluator: Evaluator,
        tracker: Tracker | None = None,
        writer: bool = True,
    ):
        """`writer=False` opens a committed campaign to read and evaluate only (a Kubeflow
        evaluation task): no lease, nothing but evaluation records is written."""
        self.config = config
        self.store = store
        self.evaluator = evaluator
        self.tracker: Tracker = tracker or NullTracker()
        self._written: dict[str, str] = {}  # genome id -> sha256 of weights written this run
        self.book = GenomeBook()
        self.archives = ArchiveSet.for_config(config)
        self.generation = -1  # last complete generation; 0 = seeded
        # A learning proposer's fitness history per skill (`cycleqd.proposers`).
        self.learned: dict[str, list[float]] = {}
        self.history: list[ChildResult] = []
        # Seconds spent here, by part (materialize_s, evaluate_s, commit_s) and models scored.
        self.timings: Counter[str] = Counter()
        # Base and experts by genome id: where they are (no read), and once opened (on first
        # use: breed and commit never open them), their weights.
        self._models: dict[str, ModelSource] = {}
        self._sources: dict[str, Weights] = {}
        # open handles on stored elites
        self._stored: dict[str, SafetensorsFolder | RemoteSafetensors] = {}
        self._register_models()
        self._materializer: Materializer | None = None
        self.writer = writer
        if writer:
            self.store.acquire()  # one writer per campaign; fails fast naming the holder
        try:
            self._resume()
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Give the campaign's lease back (another run may then resume it) and let the tracker
        deliver what it still holds."""
        try:
            self.tracker.close()
        finally:
            if self.writer:
                self.store.release()

    @property
    def evaluator(self) -> EvaluatorBase:
        return self._evaluator

    @evaluator.setter
    def evaluator(self, evaluator: Evaluator) -> None:
        self._evaluator = as_evaluator(evaluator)  # optional abilities answer, not probed

    def __enter__(self) -> Campaign:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def materializer(self) -> Materializer:
        """Built where models are materialised (evaluation, export): torch is imported there,
        so the CPU-only tasks (breed, commit) never import it."""
        if self._materializer is None:
            from cycleqd.materialize import Materializer

            self._materializer = Materializer(self.book, self._resolve, dtype=self.config.dtype)
        return self._materializer

    def _set_book(self, book: GenomeBook) -> None:
        self.book = book
        if self._materializer is not None:
            self._materializer.book = book

    # -- setup ---------------------------------------------------------------------------------

    def _register_models(self) -> None:
        """Genomes for the base and the experts. Their ids hash the locations the config
        gives, so nothing is read here: the tasks that use no weights never touch them."""
        models = self.config.models
        base = ModelSource(models.base, "base model")
        base_id = self.book.add(Genome(kind="base", source=base.genome_source))
        self._models[base_id] = base
        for skill in self.config.skill_names:
            location = self.store.expert_location(self.config, skill)
            expert = ModelSource(location, f"expert {skill!r}")
            gid = self.book.add(Genome(kind="expert", source=expert.genome_source, skill=skill))
            self._models[gid] = expert

    def _open_models(self) -> dict[str, Weights]:
        """Base and experts opened (S3: copied into this pod's cache) and checked to share
        the base's tensors and shapes, once, where weights are first needed."""
        if not self._sources:
            self._sources = open_models(self._models, base=self.book.base_id())
        return self._sources

    def model_folders(self) -> dict[str, str]:
        """Local folders of the base and the experts by genome id (S3: this pod's cached
        copies), for code that reads files itself (the vLLM worker's `genome_request`)."""
        return {gid: str(source.local_folder()) for gid, source in self._models.items()}

    def _resolve(self, genome_id: str) -> Weights | None:
        if genome_id in self._models:
            return self._open_models()[genome_id]
        source = self._stored.get(genome_id)
        if source is None and self.book[genome_id].kind in ("child", "final"):
            source = self.store.open_model(genome_id)
            if source is not None:
                self._stored[genome_id] = source
        return source

    def _resume(self) -> None:
        if not self.store.check_config(self.config):
            if not self.writer:
                raise CycleQDError(f"{self.store.uri} holds no campaign yet; seed it first")
            self.store.write_config(self.config.to_yaml())
            return
        if self.writer:
            self.store.write_config(self.config.to_yaml())
        latest = self.store.latest_generation()
        if latest is None:
            return
        snapshot = self.store.read_snapshot(latest)
        book = GenomeBook()
        book.load_list(snapshot["genomes"])
        self._set_book(book)
        self._models = {
            gid: self._models[gid]
            for gid in (self.book.base_id(), *self.book.expert_ids().values())
        }
        self.archives.load_dict(snapshot["archives"])
        self.learned = {k: [float(f) for f in v] for k, v in snapshot.get("learned", {}).items()}
        self.generation = latest
        log.info("resumed campaign %s at generation %d", self.config.name, latest)

    # -- steps ---------------------------------------------------------------------------------

    def evaluate(self, genome_id: str) -> dict[str, float] | None:
        """Materialise and score; None when the weights are not finite (the child is rejected)."""
        try:
            return self._score(genome_id)
        except NonFiniteWeightsError as exc:
            log.warning("%s", exc)
            self._stored.pop(genome_id, None)
            self.store.delete_model(genome_id)
            return None

    def _score(self, genome_id: str) -> dict[str, float]:
        if self.book.linear_form(genome_id) is None and self._resolve(genome_id) is None:
            # Off the experts' span: no recipe rebuilds it cheaply, so the weights are kept if
            # it may become an elite (a future child may be bred from it). Written to scratch
            # space once, scored from there, and published only then: non-elites cost no
            # store writes.
            specs, tensors = self.materializer.specs(), self.materializer.tensors(genome_id)
            with self.store.staged_model(genome_id, specs, tensors) as staged:
                weights = staged.weights
                if self.evaluator.reads_locations:
                    scores = self._score_staged_remotely(genome_id, staged)
                elif self.evaluator.takes_requests:
                    request = {"kind": "safetensors", "path": str(weights.folder)}
                    scores = self._timed_request(genome_id, request)
                else:
                    scores = self._timed_evaluate(
                        genome_id, ((n, weights.get(n)) for n in weights.names())
                    )
                if self._may_enter(genome_id, scores):
                    staged.publish()
                    self._written[genome_id] = staged.sha256
            return scores
        if self.book.linear_form(genome_id) is None and genome_id not in self._written:
            # Weights uploaded by an attempt that died before recording its evaluation: the
            # record must still carry their sha256 (the lineage's link to the weights).
            manifest = read_manifest(self.store.store, self.store.model_prefix(genome_id)) or {}
            sha = (manifest.get("files") or {}).get("model.safetensors")
            if isinstance(sha, str):
                self._written[genome_id] = sha
        if self.evaluator.takes_requests:
            return self._timed_request(genome_id, self._genome_request(genome_id))
        # An evaluator that offers its model's tensors gets the child written into them.
        into = self.evaluator.weight_buffers()
        return self._timed_evaluate(genome_id, self.materializer.tensors(genome_id, into=into))

    def _score_staged_remotely(self, genome_id: str, staged) -> dict[str, float]:
        """An evaluator in another pod cannot read this pod's scratch folder: the weights go
        to the store's staging area for it to read, and are deleted there after scoring."""
        staged.publish("staging")
        try:
            request = {
                "kind": "safetensors",
                "location": self.store.model_uri(genome_id, "staging"),
            }
            return self._timed_request(genome_id, request)
        finally:
            self.store.delete_model(genome_id, "staging")

    def _genome_request(self, genome_id: str) -> dict:
        """The recipe a `takes_requests` evaluator builds the genome from, with a local folder
        for every genome in its lineage that has weights (the base, the experts, stored
        elites; copied once per pod where they live in S3)."""
        from cycleqd.generate.vllm_worker import genome_request
        from cycleqd.model_sources import local_folder

        remote = self.evaluator.reads_locations
        folders = (
            {gid: source.location for gid, source in self._models.items()}
            if remote
            else self.model_folders()
        )
        lineage, frontier = set(), [genome_id]
        while frontier:  # only the genome's own ancestors can be stored weights it reads
            gid = frontier.pop()
            if gid not in lineage and gid not in folders:
                lineage.add(gid)
                frontier.extend(self.book[gid].parents)
        for gid in sorted(lineage):
            if self._resolve(gid) is not None:
                uri = self.store.model_uri(gid)
                folders[gid] = uri if remote else str(local_folder(uri, "stored elite"))
        return genome_request(
            self.book,
            genome_id,
            folders,
            dtype=self.config.dtype,
            field="locations" if remote else "folders",
        )

    def _timed_request(self, genome_id: str, request: dict) -> dict[str, float]:
        started = time.perf_counter()
        try:
            return self.evaluator.evaluate_request(genome_id, request)
        finally:
            self.timings["evaluate_s"] += time.perf_counter() - started
            self.timings["models"] += 1

    def _keep_samples(self, genome_id: str) -> dict[str, float]:
        """Store the per-sample details of the evaluation just done (see `Evaluator`); returns
        the reported qualities (HumanEval retention) that are no score."""
        samples = self.evaluator.samples(genome_id)
        if samples is None:
            return {}
        if self.config.evaluation.transcripts:
            self.store.put_json(self.store.transcript_key(genome_id), samples)
        return {name: r["quality"] for name, r in samples.items() if r.get("reported")}

    def read_samples(self, genome_id: str) -> dict | None:
        """A model's stored transcripts (see `_keep_samples`), or None."""
        return self.store.get_json(self.store.transcript_key(genome_id))

    def _may_enter(self, genome_id: str, scores: dict[str, float]) -> bool:
        """Whether the child would enter an archive as committed now. Cells only ever get
        better, so a child refused now is refused at commit too (where earlier children of
        its generation may have raised the bar further)."""
        return bool(copy.deepcopy(self.archives).offer(genome_id, scores))

    def _timed_evaluate(self, genome_id: str, tensors: Tensors) -> dict[str, float]:
        """Evaluate, adding to `timings` the seconds spent producing tensors (materialising or
        reading weights) and in the evaluator as a whole (benchmarks split a generation)."""
        started = time.perf_counter()
        spent = [0.0]

        def timed() -> Iterator[tuple[str, torch.Tensor]]:
            source = iter(tensors)
            while True:
                tic = time.perf_counter()
                item = next(source, None)
                spent[0] += time.perf_counter() - tic
                if item is None:
                    return
                yield item

        try:
            return self.evaluator.evaluate(genome_id, timed())
        finally:
            self.timings["materialize_s"] += spent[0]
            self.timings["evaluate_s"] += time.perf_counter() - started - spent[0]
            self.timings["models"] += 1

    def seed(self) -> None:
        """Generation 0: every expert, scored on every skill, offered to every archive."""
        if self.generation >= 0:
            return
        untrained = [
            s
            for s in self.config.models.trained()
            if not model_is_complete(self.store.store, self.store.expert_prefix(s))
        ]
        if untrained:
            raise CycleQDError(
                f"the expert(s) of {', '.join(untrained)} are fine-tuned by this campaign but "
                f"not published in {self.store.uri} yet: run the experts stage first "
                "(`cycleqd run` and the pipeline do; `cycleqd experts` alone)"
            )
        for skill, gid in self.book.expert_ids().items():
            try:
                scores = self._score(gid)
            except NonFiniteWeightsError as exc:
                raise NonFiniteWeightsError(
                    f"expert {skill!r} ({self.book[gid].source}) cannot seed the archives: {exc}"
                ) from None
            self._keep_samples(gid)
            entered = self.archives.offer(gid, scores)
            self.history.append(ChildResult(gid, 0, skill, scores, entered))
        self._commit(0)
        self.tracker.generation_done(
            0, self.history[-len(self.config.skills) :], self.archives, self.book
        )

    # The three parts of a generation. In process, `step` runs them in a row; in Kubeflow each
    # is a task (breed, then one evaluation task per child in a ParallelFor, then commit), and
    # every part is idempotent so that a retried or resumed task redoes nothing.

    def breed_next(self) -> list[str]:
        """Breed the next generation from the committed archives; record its children."""
        generation = self.generation + 1
        # On a copy: sampling counts change when the generation is committed, not before.
        children = breed(
            self.config, self.book, copy.deepcopy(self.archives), generation, self.learned
        )
        ids = [self.book.add(child) for child in children]
        self.store.put_json(
            self.store.pending_key(generation),
            [{"id": g, **c.to_dict()} for g, c in zip(ids, children, strict=True)],
        )
        return ids

    def load_pending(self) -> list[str]:
        """The children bred for the next generation (by another process), added to the book."""
        generation = self.generation + 1
        key = self.store.pending_key(generation)
        records = self.store.get_json(key)
        if records is None:
            raise CycleQDError(
                f"{self.store.uri}: generation {generation} has not been bred yet (no "
                f"{key}); run the breed step first"
            )
        for record in records:
            genome = Genome.from_dict(record)
            if genome.id != record.get("id"):
                raise CycleQDError(
                    f"{key}: record {record.get('id')} "
                    "does not match its content; the file was edited or corrupted"
                )
            self.book.add(genome)
        return [r["id"] for r in records]

    def evaluate_child(self, genome_id: str) -> dict:
        """Score a child once: the result is kept in the store, a retry reads it back."""
        key = self.store.evaluation_key(genome_id)
        record = self.store.get_json(key)
        if record is None:
            scores = self.evaluate(genome_id)
            reported = self._keep_samples(genome_id) if scores is not None else {}
            record = {
                "genome_id": genome_id,
                "scores": scores,
                "sha256": self._written.pop(genome_id, None),
            }
            if reported:
                record["reported"] = reported
            self.store.put_json(key, record)
        return record

    def commit_next(self) -> list[ChildResult]:
        """Offer the evaluated children to the archives in breeding order; commit a snapshot."""
        generation = self.generation + 1
        # Breeding again from the same archives and seed yields the same children and the same
        # sampling counts; a mismatch means the code or config changed mid-generation.
        children = breed(self.config, self.book, self.archives, generation, self.learned)
        recorded = self.store.get_json(self.store.pending_key(generation)) or []
        if [c.id for c in children] != [r.get("id") for r in recorded]:
            raise CycleQDError(
                f"generation {generation}: the recorded children differ from what the campaign "
                "breeds now; was the config or the cycleqd version changed mid-generation?"
            )
        results = []
        for child in children:
            gid = self.book.add(child)
            record = self.store.get_json(self.store.evaluation_key(gid))
            if record is None:
                raise CycleQDError(f"generation {generation}: child {gid} was never evaluated")
            scores = record["scores"]
            entered = self.archives.offer(gid, scores) if scores is not None else []
            sha = record.get("sha256")
            uri = self.store.model_uri(gid) if sha and entered else None
            results.append(
                ChildResult(
                    gid, generation, child.skill, scores, entered, uri, sha if uri else None
                )
            )
        if PROPOSERS[self.config.proposer.kind].learns:
            for child, result in zip(children, results, strict=True):
                value = (
                    fitness(self.archives[child.skill], result.scores or {})
                    if result.scores
                    else 0.0
                )
                # A rejected child, or one with a non-finite score, is the worst fitness.
                self.learned.setdefault(child.skill, []).append(
                    value if np.isfinite(value) else 0.0
                )
        self.history.extend(results)
        self._commit(generation)
        self.tracker.generation_done(generation, results, self.archives, self.book)
        return results

    def step(self) -> list[ChildResult]:
        for gid in self.breed_next():
            self.evaluate_child(gid)
        return self.commit_next()

    def run(self, on_generation: Callable[[int, list[ChildResult]], None] | None = None) -> None:
        self.tracker.campaign_started(
            self.config, self.book, self.generation if self.generation >= 0 else None
        )
        self.seed()
        while self.generation < self.config.generations:
            results = self.step()
            if on_generation:
                on_generation(self.generation, results)

    def final_genome_id(self) -> str:
        """The final model of the archives as they are, by the config's `final.method`: its
        genome recorded in the book, nothing read or scored (the CPU may decide from it)."""
        return self.book.add(final_genome(self.archives, self.config.final))

    def finalize(self) -> tuple[str, dict[str, float] | None]:
        gid = self.final_genome_id()
        return gid, self.evaluate(gid)

    def export(
        self,
        genome_id: str,
        scores: dict[str, float] | None = None,
        extra_files: dict[str, str] | None = None,
    ) -> str:
        """Write a genome's full weights to the store's exports, with the base's config and
        tokenizer files so that the folder loads with `from_pretrained`; returns the sha256."""
        files = {**self._base_side_files(), **(extra_files or {})}
        sha = self.store.write_model(
            genome_id,
            self.materializer.specs(),
            self.materializer.tensors(genome_id),
            extra_files=files,
            area="exports",
        )
        uri = self.store.model_uri(genome_id, "exports")
        self.tracker.model_exported(genome_id, scores, uri, sha, self.book)
        return sha

    def _base_side_files(self) -> dict[str, str]:
        return self._models[self.book.base_id()].side_files()

    def _commit(self, generation: int) -> None:
        started = time.perf_counter()
        # The snapshot carries what the archives need (elites and their ancestors, to rebuild
        # and trace them) and this generation's children; children that died in an earlier
        # generation stay only in their generation's pending/ and evaluations/ records.
        bred_now = {g for g, genome in self.book.items() if genome.generation == generation}
        self._set_book(self.book.pruned(self.archives.genome_ids() | bred_now))
        snapshot = {
            "campaign": self.config.name,
            "generation": generation,
            "archives": self.archives.to_dict(),
            "genomes": self.book.to_list(),
        }
        if self.learned:  # only a learning proposer's: other snapshots stay as they were
            snapshot["learned"] = self.learned
        self.store.renew()  # refuses to write if another run took the lease over
        self.store.write_snapshot(generation, snapshot)
        self.generation = generation
        self.store.prune_snapshots(generation)
        self._collect_garbage()
        self.timings["commit_s"] += time.perf_counter() - started

    def _collect_garbage(self) -> None:
        """Drop stored weights that no archive references: nothing will read them again.
        That includes leftovers of a crash between a write and its snapshot."""
        keep = self.archives.genome_ids()
        for gid in self.store.stored_models():
            if gid not in keep:
                self._stored.pop(gid, None)
                self.store.delete_model(gid)
