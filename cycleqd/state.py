"""Campaign state in an object store (a local folder or S3): config, genomes, archives per
generation, elite weights, and a lease that admits one writer at a time.

Keys under the campaign's store:
    config.yaml                       the campaign's config, fixed at creation
    generations/000012.json           archives + genomes after generation 12 (never rewritten;
                                      the last 20 and every 100th are kept)
    pending/000012.json               the children bred for generation 12 (their recipes)
    evaluations/<genome id>.json      a child's scores (and `reported` ones, e.g. HumanEval, that
                                      no archive sees): with pending/, a log of every child
    transcripts/<genome id>.json      every sample of a model's evaluation, per skill (replies,
                                      multi-turn transcripts, checker output); written before
                                      its evaluations/ record, read by `cycleqd inspect`
    LATEST                            number of the last complete generation (written last)
    lease.json                        who writes this campaign, until when
    models/<genome id>/               elite weights breeding reads (+ manifest, written last)
    exports/<genome id>/              exported models (final merges; + genome.json, and
                                      scores.json: the scores it was exported with)
    experts/<skill>/                  experts the campaign fine-tuned (the experts stage;
                                      + manifest with the genome record, factors.safetensors)
    training/<skill>.jsonl            the derived training set an expert was trained on
    checkpoints/experts/<skill>/      a fine-tuning run's checkpoints (deleted once published)
    preflight/<random>                a probe that preflight writes and deletes at once
    staging/<genome id>/              a child's weights, while a warm evaluator in another pod
                                      scores it (deleted after)
    runs/<run>/evaluators.json        a run's warm evaluators: addresses, token, what started
                                      them (deleted by the run's exit handler)
    runs/<run>/holds/<evaluator>.json which task uses an evaluator now, until when
    runs/<run>/run.json               the generations a pipeline run committed (its exit
                                      handler tells from it whether the run made progress)

Every key is formatted here (the `*_key` and `*_prefix` methods), nowhere else.

Objects are written whole (S3 PUTs, atomic renames locally), so a crash leaves either the old
state or the new one, never half of it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import socket
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from cycleqd.errors import ConfigError, CycleQDError, GenomeError
from cycleqd.genome import GenomeBook
from cycleqd.objectstore import (
    InvalidKeyError,
    LocalObjectStore,
    ObjectStore,
    RemoteSafetensors,
    StoreIntegrityError,
    StoreNotFoundError,
    StorePreconditionError,
    model_is_complete,
    open_store,
    publish_model,
    read_manifest,
)
from cycleqd.weights import (
    MANIFEST,
    SafetensorsFolder,
    TensorSpec,
    sha256_file,
    write_safetensors,
)

if TYPE_CHECKING:
    import torch

AREAS = ("models", "exports", "staging")
WEIGHTS_FILE = "model.safetensors"  # a stored model's weights, in models/<id>/ or exports/<id>/
EXPORT_SCORES = "scores.json"  # beside an export's weights: the scores it was exported with
SNAPSHOTS_KEPT = 20  # the latest snapshots kept (see CampaignStore.prune_snapshots)
SNAPSHOT_HISTORY_EVERY = 100  # and every 100th generation's, for history


class CampaignLockedError(CycleQDError):
    """Another run holds the campaign's lease."""


def process_alive(pid: int) -> bool:
    """Whether process `pid` of this host still runs (one of another user counts)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Lease:
    owner: str
    host: str
    pid: int  # the process that holds it: a local driver, or the task that wrote it
    expires_at: float
    driver: bool = False  # `pid` outlives the lease's tasks: when it is gone, so is the run

    def is_live(self) -> bool:
        """Not expired and, for a driver on this very host, that process still runs."""
        if self.expires_at <= time.time():
            return False
        if self.driver and self.host == socket.gethostname():
            return process_alive(self.pid)
        return True


# A run's task renews the lease its run holds without the settle wait while the lease has this
# long left (far more than a write takes, far less than the default ttl of an hour).
RENEW_MARGIN_S = 60.0


LEASE_KEY = "lease.json"


def _parse_lease(data: bytes) -> Lease | None:
    """A lease record, or None: an unreadable lease protects nothing, it counts as none and
    the next writer replaces it."""
    try:
        record = json.loads(data)
    except (ValueError, RecursionError):
        return None
    if not isinstance(record, dict):
        return None
    owner, host, pid, expires = (record.get(k) for k in ("owner", "host", "pid", "expires_at"))
    if not (isinstance(owner, str) and isinstance(host, str) and owner):
        return None
    if not (type(pid) is int and 0 < pid < 2**31):
        return None
    if type(expires) not in (int, float) or not math.isfinite(expires):
        return None
    return Lease(owner, host, pid, float(expires), record.get("driver") is True)


def _live_for(lease: Lease, seconds: float) -> bool:
    return lease.is_live() and lease.expires_at - time.time() > seconds


# A process that drives a run's tasks (`cycleqd run` through kfp.local) exports its pid here;
# its tasks' leases then die with it instead of blocking the campaign until they expire.
DRIVER_PID_ENV = "CYCLEQD_DRIVER_PID"


class CampaignStore:
    """One campaign's state under a store URI (`s3://bucket/campaigns/x` or a folder)."""

    def __init__(self, store: ObjectStore | str | Path, owner: str | None = None):
        """`owner` names a writer that spans processes (a Kubeflow run id: every task of one
        run shares the lease, which only the run's final task gives back). Without it the
        lease belongs to this object and is given back by `release`."""
        self.store = store if isinstance(store, ObjectStore) else open_store(store)
        self._lease_owner: str | None = owner
        self._shared_owner = owner is not None
        self._config = None  # the CampaignConfig `check_config` was given
        self._verified: set[str] = set()  # model folders whose weights matched their manifest

    @property
    def uri(self) -> str:
        return self.store.uri

    # -- config and snapshots ------------------------------------------------------------------

    def write_config(self, yaml_text: str) -> None:
        self.store.put_bytes("config.yaml", yaml_text.encode())

    def read_config_text(self) -> str | None:
        try:
            data = self.store.get_bytes("config.yaml")
        except StoreNotFoundError:
            return None
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise ConfigError(f"{self.uri}/config.yaml is corrupted: not UTF-8 text") from None

    def check_config(self, config) -> bool:
        """Whether the store already holds a campaign; raise if it holds another one (only
        `generations` may change between runs of one campaign)."""
        from cycleqd.config import parse_stored_config

        self._config = config  # what snapshots and records read back are checked against
        stored = self.read_config_text()
        if stored is None:
            return False
        try:
            data = yaml.safe_load(stored)
        except yaml.YAMLError as exc:
            raise ConfigError(f"{self.uri}/config.yaml is corrupted: not YAML ({exc})") from None
        previous = parse_stored_config(data, source=f"{self.uri}/config.yaml")
        if previous.model_dump(exclude={"generations"}) != config.model_dump(
            exclude={"generations"}
        ):
            raise ConfigError(
                f"{self.uri}/config.yaml holds campaign {previous.name!r} with a different "
                "config; only "
                "`generations` may change on resume. Use a new store location for a new campaign."
            )
        return True

    def latest_generation(self) -> int | None:
        try:
            data = self.store.get_bytes("LATEST")
        except StoreNotFoundError:
            return None
        # Plain ASCII digits only: int() would also take '١٢', '1_0' or ' -3 '.
        if not re.fullmatch(rb"[0-9]{1,9}\n?", data):
            raise CycleQDError(
                f"{self.uri}/LATEST is corrupted ({data[:40]!r}): expected a generation number"
            )
        return int(data)

    def write_snapshot(self, generation: int, snapshot: dict) -> None:
        """Write generation's snapshot, then move LATEST to it.

        A snapshot is never overwritten with other content: a rerun after a crash between the
        two writes produces the same bytes (runs are deterministic), anything else is a bug or
        a second writer, and is refused.
        """
        key = f"generations/{generation:06d}.json"
        data = json.dumps(snapshot, indent=1, sort_keys=True).encode()
        try:
            existing = self.store.get_bytes(key)
        except StoreNotFoundError:
            existing = None
        if existing is None:
            self.store.put_bytes(key, data)
        elif existing != data:
            raise CycleQDError(
                f"{self.uri}/{key} already exists with other content; snapshots are never "
                "overwritten. Was the campaign's config or code changed mid-campaign?"
            )
        self.store.put_bytes("LATEST", f"{generation}\n".encode())

    def prune_snapshots(self, latest: int) -> list[int]:
        """Delete the snapshots the retention policy does not keep; returns their numbers.

        Kept: the last `SNAPSHOTS_KEPT` generations up to `latest` (resume needs only the
        latest one; the others cover readers that lag behind, such as progress lines) and
        every `SNAPSHOT_HISTORY_EVERY`-th generation as history. Without a policy the store
        would hold one snapshot per generation forever. Never touches `latest` or newer.
        """
        deleted = []
        for key in self.store.list("generations/"):
            name = key.rsplit("/", 1)[1]
            if not name.endswith(".json") or not name[:-5].isdigit():
                continue
            number = int(name[:-5])
            if number > latest - SNAPSHOTS_KEPT and number <= latest:
                continue
            if number % SNAPSHOT_HISTORY_EVERY == 0 or number > latest:
                continue
            self.store.delete(key)
            deleted.append(number)
        return deleted

    def read_snapshot(self, generation: int) -> dict:
        """The snapshot of a generation, checked whole (genomes, lineage, archives; against
        the campaign's config once `check_config` has seen it): a CycleQDError naming the
        file rather than a failure deep inside the campaign."""
        key = f"generations/{generation:06d}.json"
        try:
            snapshot = json.loads(self.store.get_bytes(key))
        except StoreNotFoundError:
            raise CycleQDError(
                f"{self.uri}/{key} is missing, but LATEST names generation {generation} as the "
                "last complete one: LATEST or the snapshot was damaged; restore it, or point "
                "LATEST at the last snapshot there is"
            ) from None
        except (ValueError, RecursionError) as exc:
            raise CycleQDError(f"cannot read campaign snapshot {self.uri}/{key}: {exc}") from None
        problem = _snapshot_problem(snapshot, generation, self._config, self)
        if problem:
            raise CycleQDError(f"{self.uri}/{key} is not a valid campaign snapshot: {problem}")
        return snapshot

    def put_json(self, key: str, value: object) -> None:
        self.store.put_bytes(key, json.dumps(value, indent=1, sort_keys=True).encode())

    def get_json(self, key: str) -> object | None:
        """The object at `key`, or None if there is none; corrupt JSON is an error."""
        try:
            data = self.store.get_bytes(key)
        except StoreNotFoundError:
            return None
        try:
            value = json.loads(data)
        except (ValueError, RecursionError):
            raise CycleQDError(f"{self.uri}/{key} is corrupted: not JSON") from None
        problem = _record_problem(key, value, self._config)
        if problem:
            raise CycleQDError(f"{self.uri}/{key} is corrupted: {problem}")
        return value

    # -- the single-writer lease ---------------------------------------------------------------

    def acquire(self, ttl: float = 3600.0, settle: float = 0.2) -> None:
        """Take the campaign's lease or fail fast, naming who holds it.

        Where the store has conditional writes (a local folder; S3 services that honour
        If-None-Match / If-Match: AWS, SeaweedFS, recent MinIO) the lease is a compare-and-
        swap: written only if it is still the lease that was read, so of two runs racing for
        it exactly one wins, at once. Elsewhere it is written, then read back after `settle`
        seconds: of two racing runs, the one whose token is read back wins. A dead run's
        lease expires after `ttl` seconds; every committed generation renews it.
        """
        owner = self._lease_owner or uuid.uuid4().hex
        if self.store.conditional_writes():
            current, version = self._read_lease_versioned()
            if current and current.owner != owner and current.is_live():
                raise CampaignLockedError(self.locked_message(current))
            try:
                self.store.put_if(LEASE_KEY, self._lease_bytes(owner, ttl), version)
            except StorePreconditionError:
                raise CampaignLockedError(self.locked_message(self.read_lease())) from None
            self._lease_owner = owner
            return
        current = self.read_lease()
        if current and current.owner != owner and current.is_live():
            raise CampaignLockedError(self.locked_message(current))
        self.store.put_bytes(LEASE_KEY, self._lease_bytes(owner, ttl))
        if current and current.owner == owner and _live_for(current, RENEW_MARGIN_S):
            # A later task of the run that holds it: the lease has been live since the run won
            # it (a rival reading it since then gave up), so this is a renewal, with no race
            # to wait out. The margin keeps an about-to-expire lease on the careful path.
            self._lease_owner = owner
            return
        time.sleep(settle)
        current = self.read_lease()
        if current is None or current.owner != owner:
            raise CampaignLockedError(self.locked_message(current))
        self._lease_owner = owner

    def renew(self, ttl: float = 3600.0) -> None:
        if self._lease_owner is None:
            return
        if self.store.conditional_writes():
            current, version = self._read_lease_versioned()
            if current is not None and current.owner == self._lease_owner:
                try:
                    self.store.put_if(LEASE_KEY, self._lease_bytes(self._lease_owner, ttl), version)
                    return
                except StorePreconditionError:
                    current = self.read_lease()
            raise CampaignLockedError(
                f"lost the lease on {self.uri}: " + self.locked_message(current)
            )
        current = self.read_lease()
        if current is None or current.owner != self._lease_owner:
            raise CampaignLockedError(
                f"lost the lease on {self.uri}: " + self.locked_message(current)
            )
        self.store.put_bytes(LEASE_KEY, self._lease_bytes(self._lease_owner, ttl))

    def release(self, *, shared: bool = False) -> None:
        """Give the lease back; a shared (run-wide) lease only when `shared` is set."""
        if self._lease_owner is None or (self._shared_owner and not shared):
            return
        current = self.read_lease()
        if current is not None and current.owner == self._lease_owner:
            self.store.delete(LEASE_KEY)
        if not self._shared_owner:
            self._lease_owner = None

    def read_lease(self) -> Lease | None:
        try:
            data = self.store.get_bytes(LEASE_KEY)
        except (StoreNotFoundError, StoreIntegrityError):
            return None
        return _parse_lease(data)

    def _read_lease_versioned(self) -> tuple[Lease | None, str | None]:
        """The lease and the version a conditional write must find; (None, None): none."""
        try:
            data, version = self.store.get_versioned(LEASE_KEY)
        except StoreNotFoundError:
            return None, None
        return _parse_lease(data), version

    def _lease_bytes(self, owner: str, ttl: float) -> bytes:
        driver = os.environ.get(DRIVER_PID_ENV, "")
        lease = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": int(driver) if driver.isdigit() else os.getpid(),
            # In process, the holder is the driver; a cluster task's pid says nothing.
            "driver": driver.isdigit() or not self._shared_owner,
            "expires_at": time.time() + ttl,
        }
        return json.dumps(lease).encode()

    def locked_message(self, lease: Lease | None) -> str:
        if lease is None:
            return (
                f"another run took {self.uri} at the same time (its lease.json replaced this "
                "run's); retry in a moment"
            )
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lease.expires_at))
        return (
            f"campaign {self.uri} is being written by another run (host {lease.host}, pid "
            f"{lease.pid}, owner {lease.owner}: a Kubeflow run's id) until {until}. Wait for "
            "it to finish, or stop that run; if it died, its lease expires then, or delete "
            "lease.json from the campaign to take over now."
        )

    def check_writable(self) -> None:
        """Write and delete a probe object: credentials, bucket and write access in one go."""
        probe = f"preflight/{uuid.uuid4().hex}"
        self.store.put_bytes(probe, b"ok")
        self.store.delete(probe)

    # -- per-generation and per-genome records -----------------------------------------------

    TRANSCRIPTS = "transcripts/"

    @staticmethod
    def pending_key(generation: int) -> str:
        return f"pending/{int(generation):06d}.json"

    @staticmethod
    def run_key(owner: str) -> str:
        return f"{_run_folder(owner)}/run.json"

    @staticmethod
    def run_prefix(owner: str) -> str:
        return f"{_run_folder(owner)}/"

    @staticmethod
    def evaluators_key(owner: str) -> str:
        return f"{_run_folder(owner)}/evaluators.json"

    @staticmethod
    def evaluator_hold_key(owner: str, evaluator: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", evaluator):
            raise ValueError(f"evaluator name {evaluator!r}: letters, digits, '_.-' only")
        return f"{_run_folder(owner)}/holds/{evaluator}.json"

    @staticmethod
    def evaluation_key(genome_id: str) -> str:
        return f"evaluations/{genome_id}.json"

    @staticmethod
    def transcript_key(genome_id: str) -> str:
        return f"{CampaignStore.TRANSCRIPTS}{genome_id}.json"

    @staticmethod
    def genome_of_transcript(key: str) -> str:
        """The genome id a transcripts/ key is for (the inverse of `transcript_key`)."""
        return key.removeprefix(CampaignStore.TRANSCRIPTS).removesuffix(".json")

    @staticmethod
    def model_prefix(genome_id: str, area: str = "models") -> str:
        """models/<id> (elite weights) or exports/<id> (exported final models)."""
        return _model_prefix(area, genome_id)

    # -- experts the campaign fine-tunes ------------------------------------------------------

    @staticmethod
    def expert_prefix(skill: str) -> str:
        return f"experts/{skill}"

    def expert_uri(self, skill: str) -> str:
        """Where the experts stage publishes this skill's expert (its genome's source)."""
        return f"{self.uri.rstrip('/')}/{self.expert_prefix(skill)}"

    def expert_location(self, config, skill: str) -> str:
        """Where a skill's expert is: as the config gives it, or, for an expert the campaign
        fine-tunes, where the experts stage publishes it in this store."""
        entry = config.models.experts[skill]
        return entry if isinstance(entry, str) else self.expert_uri(skill)

    @staticmethod
    def training_set_key(skill: str) -> str:
        return f"training/{skill}.jsonl"

    @staticmethod
    def checkpoints_prefix(skill: str) -> str:
        return f"checkpoints/experts/{skill}"

    # -- weights -------------------------------------------------------------------------------

    def model_uri(self, genome_id: str, area: str = "models") -> str:
        return f"{self.uri.rstrip('/')}/{_model_prefix(area, genome_id)}"

    def export_scores_key(self, genome_id: str) -> str:
        return f"{_model_prefix('exports', genome_id)}/{EXPORT_SCORES}"

    def completed_export(self, genome_id: str) -> dict | None:
        """The export of `genome_id` if it is complete (its manifest and every file the
        manifest names): the sha256 of its weights and the scores recorded beside them (None
        for an export written without). None when there is no complete export (one that a
        crash left half-written is written again)."""
        prefix = _model_prefix("exports", genome_id)
        if not model_is_complete(self.store, prefix):
            return None
        manifest = read_manifest(self.store, prefix) or {}
        return {
            "sha256": manifest["files"].get(WEIGHTS_FILE),
            "scores": self.get_json(self.export_scores_key(genome_id)),
        }

    def has_model(self, genome_id: str, area: str = "models") -> bool:
        return self.store.exists(f"{_model_prefix(area, genome_id)}/{MANIFEST}")

    def open_model(
        self, genome_id: str, area: str = "models"
    ) -> SafetensorsFolder | RemoteSafetensors | None:
        """Stored weights, read tensor by tensor (memory-mapped locally, ranged GETs on S3)."""
        if not self.has_model(genome_id, area):
            return None
        prefix = _model_prefix(area, genome_id)
        # The manifest vouches for the folder: one that is corrupted, or names files that are
        # not there with their sizes, is an error here, not a failure mid-materialisation.
        if not model_is_complete(self.store, prefix):
            raise CycleQDError(
                f"{self.uri}/{prefix} is corrupted: its {MANIFEST} is unreadable or does not "
                "match the files there; delete the folder (it is rebuilt from its genome where "
                "possible) or restore it"
            )
        self._verify_weights(prefix)
        if isinstance(self.store, LocalObjectStore):
            return SafetensorsFolder(Path(self.store.root) / prefix)
        return RemoteSafetensors(self.store, prefix)

    def _verify_weights(self, prefix: str) -> None:
        """Check the bytes of a model's weight files against the sha256 its manifest records,
        once per folder and CampaignStore. Weights are read memory-mapped or by ranged GETs,
        which no whole-object check covers: without this, a flipped byte in an elite's
        weights would be bred from silently. Costs one sequential read of the weights (the
        evaluation reads them all anyway)."""
        if prefix in self._verified:
            return
        manifest = read_manifest(self.store, prefix) or {}
        for name, recorded in sorted((manifest.get("files") or {}).items()):
            if not name.endswith(".safetensors"):
                continue
            key = f"{prefix}/{name}"
            actual = _content_sha256(self.store, key)
            if actual != recorded:
                raise StoreIntegrityError(
                    f"{self.uri}/{key} is corrupted: its bytes have sha256 {actual[:16]}..., "
                    f"its manifest records {str(recorded)[:16]}...; it is not used. Delete "
                    f"{self.uri}/{prefix}/ and resume from a snapshot that does not need it, "
                    "or restore it"
                )
        self._verified.add(prefix)

    def write_model(
        self,
        genome_id: str,
        specs: dict[str, TensorSpec],
        tensors: Iterable[tuple[str, torch.Tensor]],
        extra_files: dict[str, str] | None = None,
        area: str = "models",
    ) -> str:
        """Stream a model into <area>/<id>/; visible (manifest) only once complete.
        Returns the sha256 of its weights file."""
        with self.staged_model(genome_id, specs, tensors, extra_files, area) as staged:
            staged.publish()
            return staged.sha256

    @contextmanager
    def staged_model(
        self,
        genome_id: str,
        specs: dict[str, TensorSpec],
        tensors: Iterable[tuple[str, torch.Tensor]],
        extra_files: dict[str, str] | None = None,
        area: str = "models",
    ) -> Iterator[StagedModel]:
        """Stream a model into a local scratch folder, to be read (`staged.weights`) and then
        published into <area>/<id>/ (`staged.publish()`) or dropped: the scratch folder is
        deleted on exit either way. The store sees nothing unless it is published."""
        with tempfile.TemporaryDirectory(prefix="cycleqd-model-") as tmp:
            files = {WEIGHTS_FILE: Path(tmp) / WEIGHTS_FILE}
            sha = write_safetensors(files[WEIGHTS_FILE], specs, tensors, {"genome": genome_id})
            for name, text in (extra_files or {}).items():
                files[name] = Path(tmp) / name
                files[name].write_text(text)

            def publish(into: str = area) -> None:
                prefix = _model_prefix(into, genome_id)
                publish_model(self.store, prefix, files, {"genome": genome_id})

            yield StagedModel(SafetensorsFolder(tmp), sha, publish)

    def stored_models(self, area: str = "models") -> list[str]:
        prefix = f"{_area(area)}/"
        found = {key[len(prefix) :].split("/", 1)[0] for key in self.store.list(prefix)}
        return sorted(g for g in found if _GENOME_ID.match(g))  # foreign folders are left alone

    def delete_model(self, genome_id: str, area: str = "models") -> None:
        # The manifest goes first, so that a crash mid-delete leaves an invisible folder.
        prefix = _model_prefix(area, genome_id)
        self.store.delete(f"{prefix}/{MANIFEST}")
        self.store.delete_prefix(f"{prefix}/")


@dataclass(frozen=True)
class StagedModel:
    """A model written to local scratch space (see `CampaignStore.staged_model`)."""

    weights: SafetensorsFolder
    sha256: str
    publish: Callable[..., None]  # publish(area="models" or the area it was staged for)


def _content_sha256(store: ObjectStore, key: str, chunk: int = 64 << 20) -> str:
    """sha256 of an object's bytes, streamed (never the whole object in memory)."""
    if isinstance(store, LocalObjectStore):
        return sha256_file(Path(store.root).joinpath(*key.split("/")))
    digest, start = hashlib.sha256(), 0
    while block := store.get_range(key, start, start + chunk):
        digest.update(block)
        start += len(block)
    return digest.hexdigest()


def _run_folder(owner: str) -> str:
    """A run's folder: its id where that is a plain name (KFP's run ids are UUIDs), else a
    digest of it, so that no run id can name a key outside runs/."""
    if re.fullmatch(r"[A-Za-z0-9_.-]{1,80}", owner) and owner.strip(".") == owner:
        return f"runs/{owner}"
    return f"runs/{hashlib.sha256(owner.encode()).hexdigest()[:32]}"


def _area(area: str) -> str:
    if area not in AREAS:
        raise ValueError(f"unknown model area {area!r}; allowed: {AREAS}")
    return area


# Genome ids are content hashes; anything else must not become a key (no '/', '..', ...).
_GENOME_ID = re.compile(r"^[0-9a-f]{16}$")
_EVALUATION = re.compile(r"^evaluations/(.*)\.json$")
_PENDING = re.compile(r"^pending/[0-9]{6}\.json$")


def _model_prefix(area: str, genome_id: str) -> str:
    if not isinstance(genome_id, str) or not _GENOME_ID.match(genome_id):
        raise InvalidKeyError(
            f"invalid genome id {genome_id!r}: expected 16 lowercase hex digits (a content id)"
        )
    return f"{_area(area)}/{genome_id}"


def _genome_problem(
    records: object, config, store: CampaignStore
) -> tuple[GenomeBook | None, str | None]:
    """Load genome records into a book: (book, None), or (None, what is wrong)."""
    book = GenomeBook()
    try:
        book.load_list(records)  # type: ignore[arg-type]
        base = book.base_id()
    except GenomeError as exc:
        return None, str(exc)
    if config is not None:
        from cycleqd.genome import Genome
        from cycleqd.model_sources import genome_source

        # Base and experts must be this config's models (their ids hash their locations).
        expected = {Genome(kind="base", source=genome_source(config.models.base)).id: "base"}
        for skill in config.models.experts:
            location = store.expert_location(config, skill)
            gid = Genome(kind="expert", source=genome_source(location), skill=skill).id
            expected[gid] = skill
        found = {base, *book.expert_ids().values()}
        if found != set(expected):
            return None, "its base and expert genomes are not this campaign's models"
    return book, None


def _snapshot_problem(
    snapshot: object, generation: int, config, store: CampaignStore
) -> str | None:
    if not isinstance(snapshot, dict):
        return "not a JSON object"
    fields = {"campaign": str, "generation": int, "archives": dict, "genomes": list}
    for name, kind in fields.items():
        if type(snapshot.get(name)) is not kind:
            return f"field {name!r} is missing or not a {kind.__name__}"
    if snapshot["generation"] != generation:
        return f"it holds generation {snapshot['generation']}, not {generation}"
    if config is not None and snapshot["campaign"] != config.name:
        return f"it belongs to campaign {snapshot['campaign']!r}, not {config.name!r}"
    book, problem = _genome_problem(snapshot["genomes"], config, store)
    if problem:
        return problem
    if config is not None:
        from cycleqd.archive import ArchiveSet

        archives = ArchiveSet.for_config(config)
        try:
            archives.load_dict(snapshot["archives"])
        except CycleQDError as exc:
            return str(exc)
        referenced = archives.genome_ids()
    else:
        referenced = set()
        for entries in snapshot["archives"].values():
            if not isinstance(entries, list) or not all(
                isinstance(e, dict)
                and isinstance(e.get("genome_id"), str)
                and type(e.get("quality")) in (int, float)
                and math.isfinite(e["quality"])
                for e in entries
            ):
                return "an archive is not a list of elites with a genome_id and a quality"
            referenced |= {e["genome_id"] for e in entries}
    unknown = sorted(g for g in referenced if g not in book)
    if unknown:
        return f"archives hold genomes that are not in it: {unknown[:3]}"
    return None


def _record_problem(key: str, value: object, config) -> str | None:
    """What is wrong with a record the campaign reads back (pending children, evaluations);
    None when it is well formed (or not a record this module knows)."""
    if _PENDING.match(key):
        if not isinstance(value, list):
            return "expected a list of child genome records"
        for record in value:
            from cycleqd.genome import Genome

            try:
                genome = Genome.from_dict(record)
            except GenomeError as exc:
                return str(exc)
            if genome.kind != "child" or genome.id != record.get("id"):
                return f"record {str(record.get('id'))[:40]!r} does not match its content"
        return None
    match = _EVALUATION.match(key)
    if match:
        required = {"genome_id", "scores", "sha256"}
        if not isinstance(value, dict) or not required <= set(value) <= {*required, "reported"}:
            return "expected an object with genome_id, scores and sha256 (and reported)"
        reported = value.get("reported", {})
        if not isinstance(reported, dict) or not all(
            type(v) in (int, float) for v in reported.values()
        ):
            return "reported must be a mapping of names to numbers"
        if value["genome_id"] != match.group(1):
            return f"it is the evaluation of {str(value['genome_id'])[:40]!r}"
        scores = value["scores"]
        if scores is not None:
            if not isinstance(scores, dict) or not all(
                type(v) in (int, float) for v in scores.values()
            ):
                return "scores must be null or a mapping of skills to numbers"
            if config is not None and set(scores) != set(config.skill_names):
                return (
                    f"scores name {sorted(scores)}, the campaign's skills are {config.skill_names}"
                )
        sha = value["sha256"]
        if sha is not None and not (isinstance(sha, str) and re.fullmatch(r"[0-9a-f]{64}", sha)):
            return "sha256 must be null or 64 hex digits"
    return None
