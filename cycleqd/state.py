"""Campaign state in an object store (a local folder or S3): config, genomes, archives per
generation, elite weights, and a lease that admits one writer at a time.

Keys under the campaign's store:
    config.yaml                       the campaign's config, fixed at creation
    generations/000012.json           archives + genomes after generation 12 (never rewritten)
    LATEST                            number of the last complete generation (written last)
    lease.json                        who writes this campaign, until when
    models/<genome id>/               elite weights breeding reads (+ manifest, written last)
    exports/<genome id>/              exported models (final merges)

Objects are written whole (S3 PUTs, atomic renames locally), so a crash leaves either the old
state or the new one, never half of it.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from cycleqd.errors import ConfigError, CycleQDError
from cycleqd.objectstore import (
    LocalObjectStore,
    ObjectStore,
    RemoteSafetensors,
    StoreNotFoundError,
    open_store,
    publish_model,
)
from cycleqd.weights import MANIFEST, SafetensorsFolder, TensorSpec, write_safetensors

AREAS = ("models", "exports")


class CampaignLockedError(CycleQDError):
    """Another run holds the campaign's lease."""


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
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                return True
        return True


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

    @property
    def uri(self) -> str:
        return self.store.uri

    # -- config and snapshots ------------------------------------------------------------------

    def write_config(self, yaml_text: str) -> None:
        self.store.put_bytes("config.yaml", yaml_text.encode())

    def read_config_text(self) -> str | None:
        try:
            return self.store.get_bytes("config.yaml").decode()
        except StoreNotFoundError:
            return None

    def check_config(self, config) -> bool:
        """Whether the store already holds a campaign; raise if it holds another one (only
        `generations` may change between runs of one campaign)."""
        from cycleqd.config import parse_config

        stored = self.read_config_text()
        if stored is None:
            return False
        previous = parse_config(yaml.safe_load(stored), source=f"{self.uri}/config.yaml")
        if previous.model_dump(exclude={"generations"}) != config.model_dump(
            exclude={"generations"}
        ):
            raise ConfigError(
                f"{self.uri} holds campaign {previous.name!r} with a different config; only "
                "`generations` may change on resume. Use a new store location for a new campaign."
            )
        return True

    def latest_generation(self) -> int | None:
        try:
            text = self.store.get_bytes("LATEST").decode()
        except StoreNotFoundError:
            return None
        try:
            return int(text.strip())
        except ValueError:
            raise CycleQDError(
                f"{self.uri}/LATEST is corrupted ({text[:40]!r}): expected a generation number"
            ) from None

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

    def read_snapshot(self, generation: int) -> dict:
        key = f"generations/{generation:06d}.json"
        try:
            snapshot = json.loads(self.store.get_bytes(key))
        except (StoreNotFoundError, ValueError) as exc:
            raise CycleQDError(f"cannot read campaign snapshot {self.uri}/{key}: {exc}") from None
        if not isinstance(snapshot, dict) or not {"archives", "genomes"} <= set(snapshot):
            raise CycleQDError(f"{self.uri}/{key} is not a campaign snapshot")
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
            return json.loads(data)
        except ValueError:
            raise CycleQDError(f"{self.uri}/{key} is corrupted: not JSON") from None

    # -- the single-writer lease ---------------------------------------------------------------

    def acquire(self, ttl: float = 3600.0, settle: float = 0.2) -> None:
        """Take the campaign's lease or fail fast, naming who holds it.

        Object stores offer no portable compare-and-swap, so the lease is written, then read
        back after `settle` seconds: of two runs racing for it, the one whose token is read
        back wins and the other fails. A dead run's lease expires after `ttl` seconds; every
        committed generation renews it.
        """
        current = self.read_lease()
        owner = self._lease_owner or uuid.uuid4().hex
        if current and current.owner != owner and current.is_live():
            raise CampaignLockedError(self.locked_message(current))
        self._write_lease(owner, ttl)
        time.sleep(settle)
        current = self.read_lease()
        if current is None or current.owner != owner:
            raise CampaignLockedError(self.locked_message(current))
        self._lease_owner = owner

    def renew(self, ttl: float = 3600.0) -> None:
        if self._lease_owner is None:
            return
        current = self.read_lease()
        if current is None or current.owner != self._lease_owner:
            raise CampaignLockedError(
                f"lost the lease on {self.uri}: " + self.locked_message(current)
            )
        self._write_lease(self._lease_owner, ttl)

    def release(self, *, shared: bool = False) -> None:
        """Give the lease back; a shared (run-wide) lease only when `shared` is set."""
        if self._lease_owner is None or (self._shared_owner and not shared):
            return
        current = self.read_lease()
        if current is not None and current.owner == self._lease_owner:
            self.store.delete("lease.json")
        if not self._shared_owner:
            self._lease_owner = None

    def read_lease(self) -> Lease | None:
        try:
            data = json.loads(self.store.get_bytes("lease.json"))
            return Lease(
                str(data["owner"]),
                str(data["host"]),
                int(data["pid"]),
                float(data["expires_at"]),
                bool(data.get("driver", False)),
            )
        except StoreNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            return None  # an unreadable lease protects nothing; the next writer replaces it

    def _write_lease(self, owner: str, ttl: float) -> None:
        driver = os.environ.get(DRIVER_PID_ENV, "")
        lease = {
            "owner": owner,
            "host": socket.gethostname(),
            "pid": int(driver) if driver.isdigit() else os.getpid(),
            # In process, the holder is the driver; a cluster task's pid says nothing.
            "driver": driver.isdigit() or not self._shared_owner,
            "expires_at": time.time() + ttl,
        }
        self.store.put_bytes("lease.json", json.dumps(lease).encode())

    def locked_message(self, lease: Lease | None) -> str:
        if lease is None:
            return f"another run took {self.uri} at the same time; retry in a moment"
        until = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(lease.expires_at))
        return (
            f"campaign {self.uri} is being written by another run (host {lease.host}, pid "
            f"{lease.pid}) until {until}. Wait for it to finish; if it died, its lease expires "
            "then, or delete lease.json from the campaign to take over now."
        )

    # -- weights -------------------------------------------------------------------------------

    def model_uri(self, genome_id: str, area: str = "models") -> str:
        return f"{self.uri.rstrip('/')}/{area}/{genome_id}"

    def has_model(self, genome_id: str, area: str = "models") -> bool:
        return self.store.exists(f"{_area(area)}/{genome_id}/{MANIFEST}")

    def open_model(
        self, genome_id: str, area: str = "models"
    ) -> SafetensorsFolder | RemoteSafetensors | None:
        """Stored weights, read tensor by tensor (memory-mapped locally, ranged GETs on S3)."""
        if not self.has_model(genome_id, area):
            return None
        prefix = f"{_area(area)}/{genome_id}"
        if isinstance(self.store, LocalObjectStore):
            return SafetensorsFolder(Path(self.store.root) / prefix)
        return RemoteSafetensors(self.store, prefix)

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
        with tempfile.TemporaryDirectory(prefix="cycleqd-model-") as tmp:
            files = {"model.safetensors": Path(tmp) / "model.safetensors"}
            sha = write_safetensors(
                files["model.safetensors"], specs, tensors, {"genome": genome_id}
            )
            for name, text in (extra_files or {}).items():
                files[name] = Path(tmp) / name
                files[name].write_text(text)
            publish_model(self.store, f"{_area(area)}/{genome_id}", files, {"genome": genome_id})
        return sha

    def stored_models(self, area: str = "models") -> list[str]:
        prefix = f"{_area(area)}/"
        return sorted({key[len(prefix) :].split("/", 1)[0] for key in self.store.list(prefix)})

    def delete_model(self, genome_id: str, area: str = "models") -> None:
        # The manifest goes first, so that a crash mid-delete leaves an invisible folder.
        prefix = f"{_area(area)}/{genome_id}"
        self.store.delete(f"{prefix}/{MANIFEST}")
        self.store.delete_prefix(f"{prefix}/")


def _area(area: str) -> str:
    if area not in AREAS:
        raise ValueError(f"unknown model area {area!r}; allowed: {AREAS}")
    return area
