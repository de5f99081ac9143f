"""Experts in the store: the merged model folder, its task vector factors, its genome record.

An expert is published as one unit under `<prefix>/` of a store (`publish_model`: the
manifest is written last): `model.safetensors` (or the imported expert's own shards) with the
base's tensor names, shapes and dtypes, `config.json` and the tokenizer files, and
`task_vector/factors.safetensors` (see `cycleqd.finetune.factors`). The manifest's metadata
holds the genome-style record: the expert genome (`kind: expert`, its store URI, its skill)
and its id, the base (URI and weights sha256), the data set (URI, sha256 digest, rows), the
method and hyperparameters, the training summary and the evaluation.

`import_expert` publishes an expert trained elsewhere (a local folder, a store URI or a
Hugging Face repo id; full weights or a PEFT LoRA adapter folder) the same way, after
checking it against the base's architecture.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from cycleqd.errors import ModelMismatchError
from cycleqd.finetune.factors import (
    FACTORS_FILE,
    full_factors,
    lora_factors,
    plan_for,
    write_factors,
)
from cycleqd.finetune.sources import (
    fetch_model_folder,
    is_uri,
    local_path,
    model_files,
    weights_digest,
)
from cycleqd.finetune.trainer import FinetuneError, load_causal_lm, quiet_peft, wrap_lora
from cycleqd.genome import Genome
from cycleqd.objectstore import ObjectStore, open_store, publish_model, read_manifest
from cycleqd.weights import SafetensorsFolder, check_compatible, sha256_file, write_safetensors

log = logging.getLogger(__name__)

EXPERT_KIND = "cycleqd-expert"
WEIGHTS_FILE = "model.safetensors"


@dataclass(frozen=True)
class PublishedExpert:
    """Where an expert was published, with its weights digest and manifest."""

    store_uri: str
    prefix: str
    sha256: str  # of model.safetensors (several shards: sha256 of their `sha  name` lines)
    genome_id: str
    manifest: dict

    @property
    def uri(self) -> str:
        return f"{self.store_uri.rstrip('/')}/{self.prefix}"

    @property
    def genome(self) -> Genome:
        return Genome.from_dict(self.manifest["genome"])


@dataclass(frozen=True)
class LoraWeights:
    a: torch.Tensor  # r x in
    b: torch.Tensor  # out x r
    scale: float
    fan_in_fan_out: bool = False

    def factors(self):
        u, s, vh = lora_factors(self.a, self.b, self.scale)
        if self.fan_in_fan_out:  # the weight is stored transposed (GPT-2 Conv1D)
            return vh.T.contiguous(), s, u.T.contiguous()
        return u, s, vh

    @property
    def shape(self) -> tuple[int, int]:
        out, cols = self.b.shape[0], self.a.shape[1]
        return (cols, out) if self.fan_in_fan_out else (out, cols)


def lora_modules(model) -> dict[str, LoraWeights]:
    """Base weight name -> the LoRA factors of a peft model's active adapter (CPU copies)."""
    from peft.tuners.lora import LoraLayer

    adapter = getattr(model, "active_adapter", "default")
    if isinstance(adapter, (list, tuple)):
        adapter = adapter[0]
    out = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or adapter not in module.lora_A:
            continue
        base_name = name.removeprefix("base_model.model.") + ".weight"
        out[base_name] = LoraWeights(
            module.lora_A[adapter].weight.detach().to("cpu", torch.float32).clone(),
            module.lora_B[adapter].weight.detach().to("cpu", torch.float32).clone(),
            float(module.scaling[adapter]),
            bool(getattr(module, "fan_in_fan_out", False)),
        )
    return out


def adapter_state(model) -> dict[str, torch.Tensor]:
    """The trainable (adapter) weights of a peft model, as CPU float32 copies."""
    return {
        n: p.detach().to("cpu", torch.float32).clone()
        for n, p in model.named_parameters()
        if p.requires_grad
    }


def merge_lora(base_dir: Path, config, adapters: Mapping[str, torch.Tensor], device) -> object:
    """The base (float32) with the trained adapters merged in (`merge_and_unload`)."""
    model = load_causal_lm(base_dir, torch.float32, device)
    peft_model = wrap_lora(model, config)
    params = dict(peft_model.named_parameters())
    missing = sorted(set(adapters) - set(params))
    if missing:
        raise FinetuneError(f"trained adapters {missing[:3]} have no place in the base model")
    with torch.no_grad():
        for name, tensor in adapters.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))
    with quiet_peft():
        return peft_model.merge_and_unload()


# -- writing the folder ------------------------------------------------------------------------


def _base_side_files(base_dir: Path) -> dict[str, Path]:
    """config.json, tokenizer and generation files of the base (no weights, no index)."""
    return {
        name: path
        for name, path in model_files(base_dir).items()
        if not name.endswith(".safetensors") and not name.endswith(".index.json")
    }


def write_expert_weights(
    path: Path,
    base: SafetensorsFolder,
    tensor: Callable[[str], torch.Tensor],
    metadata: Mapping[str, str] | None = None,
) -> str:
    """The expert's weights under the base's names, shapes and dtypes; returns the sha256."""
    specs = base.specs()
    return write_safetensors(
        path,
        specs,
        ((name, tensor(name)) for name in sorted(specs)),
        {"format": "pt", **(metadata or {})},
    )


def state_getter(model) -> Callable[[str], torch.Tensor]:
    state = model.state_dict()

    def get(name: str) -> torch.Tensor:
        if name not in state:
            raise ModelMismatchError(
                f"the trained model has no tensor {name!r}, which the base's safetensors hold"
            )
        return state[name].detach()

    return get


def changed_weights(
    base: SafetensorsFolder, expert: Callable[[str], torch.Tensor], names
) -> list[str]:
    """The names (among `names`) whose expert tensor differs from the base's."""
    out = []
    for name in names:
        b = base.get(name)
        e = expert(name).to("cpu")
        if e.dtype != b.dtype:
            e, b = e.float(), b.float()
        if not torch.equal(e, b):
            out.append(name)
    return out


def write_full_factors(
    path: Path,
    base: SafetensorsFolder,
    expert: Callable[[str], torch.Tensor],
    rank: int | None,
    device: torch.device,
) -> dict:
    """SVD factors of every changed 2-D weight of `expert - base`; returns a summary."""
    specs = base.specs()
    shapes = {n: s.shape for n, s in specs.items()}
    candidates = plan_for(shapes, rank)
    changed = changed_weights(base, expert, sorted(candidates))
    plan = {n: candidates[n] for n in changed}

    def produce(name: str):
        delta = expert(name).to(device, torch.float32) - base.get(name).to(device, torch.float32)
        return full_factors(delta, rank)

    sha = write_factors(path, plan, produce, kind="full")
    return {"file": FACTORS_FILE, "kind": "full", "rank": rank, "tensors": len(plan), "sha256": sha}


def write_lora_factors(path: Path, lora: Mapping[str, LoraWeights], base: SafetensorsFolder):
    specs = base.specs()
    unknown = sorted(set(lora) - set(specs))
    if unknown:
        raise ModelMismatchError(
            f"LoRA modules {unknown[:3]} adapt weights the base's safetensors do not hold"
        )
    for name, weights in lora.items():
        if tuple(specs[name].shape) != weights.shape:
            raise ModelMismatchError(
                f"the LoRA adapter of {name} is {list(weights.shape)}, the base's weight is "
                f"{list(specs[name].shape)}"
            )
    plan = {n: (w.shape, min(w.a.shape[0], *w.shape)) for n, w in lora.items()}
    sha = write_factors(path, plan, lambda n: lora[n].factors(), kind="lora")
    ranks = sorted({k for _, k in plan.values()})
    return {
        "file": FACTORS_FILE,
        "kind": "lora",
        "rank": ranks[-1] if ranks else 0,
        "tensors": len(plan),
        "sha256": sha,
    }


def publish_expert(
    store: ObjectStore,
    prefix: str,
    files: Mapping[str, Path],
    weights_sha: str,
    *,
    skill: str | None,
    record: Mapping[str, object],
) -> PublishedExpert:
    """Publish the folder; the manifest (last) carries the genome record."""
    prefix = prefix.strip("/")
    uri = f"{store.uri.rstrip('/')}/{prefix}"
    genome = Genome(kind="expert", source=uri, skill=skill)
    metadata = {
        "kind": EXPERT_KIND,
        "genome": genome.to_dict(),
        "genome_id": genome.id,
        "sha256": weights_sha,
        **record,
    }
    manifest = publish_model(store, prefix, dict(files), metadata)
    return PublishedExpert(store.uri, prefix, weights_sha, genome.id, manifest)


def published_expert(store: ObjectStore, prefix: str) -> PublishedExpert | None:
    """The expert published at `prefix` (complete manifest), else None."""
    from cycleqd.objectstore import model_is_complete

    prefix = prefix.strip("/")
    if not model_is_complete(store, prefix):
        return None
    manifest = read_manifest(store, prefix) or {}
    if manifest.get("kind") != EXPERT_KIND:
        return None
    return PublishedExpert(
        store.uri, prefix, manifest.get("sha256", ""), manifest.get("genome_id", ""), manifest
    )


# -- importing -----------------------------------------------------------------------------------


def _device(device) -> torch.device:
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def import_expert(
    source: str | Path,
    base: str | Path,
    store: ObjectStore | str | Path,
    prefix: str,
    *,
    skill: str | None = None,
    rank: int | None = None,
    device: str | torch.device | None = None,
    cache_dir: str | Path | None = None,
) -> PublishedExpert:
    """Publish an expert trained elsewhere into `store` at `prefix`, with its factors.

    source: a model folder (full weights in safetensors), a PEFT LoRA adapter folder
        (adapter_config.json + adapter_model.safetensors: merged into the base), a store URI
        of either, or a Hugging Face repo id (downloaded where the Hub can be reached).
    base: the base model it was fine-tuned from (folder or store URI).
    rank: keep the top `rank` singular values of full task vectors (None: all).
    Raises ModelMismatchError when the expert does not have the base's architecture.
    """
    store = store if isinstance(store, ObjectStore) else open_store(store)
    device = _device(device)
    label = str(source)
    with tempfile.TemporaryDirectory(prefix="cycleqd-import-", dir=cache_dir) as tmp:
        tmp = Path(tmp)
        base_dir, base_sha = fetch_model_folder(base, tmp / "base", what="base")
        src_dir, _ = fetch_model_folder(source, tmp / "source", what="expert")
        base_folder = SafetensorsFolder(base_dir)
        out = tmp / "out"
        out.mkdir()
        if (src_dir / "adapter_config.json").exists():
            files, weights_sha, task_vector = _import_adapter(src_dir, base_dir, out, label, device)
            method = "import-lora"
        else:
            expert_folder = SafetensorsFolder(src_dir)
            check_compatible(base_folder, {f"expert {label}": expert_folder})
            files = {**_base_side_files(base_dir), **model_files(src_dir)}
            weights_sha = weights_digest(
                {n: sha256_file(p) for n, p in files.items() if n.endswith(".safetensors")}
            )
            task_vector = write_full_factors(
                out / FACTORS_FILE, base_folder, expert_folder.get, rank, device
            )
            method = "import"
        files[FACTORS_FILE] = out / FACTORS_FILE
        source_uri = str(source)
        local = local_path(source) if not is_uri(str(source)) else None
        if local is not None and local.exists():
            source_uri = str(local.absolute())
        record = {
            "method": method,
            "imported_from": source_uri,
            "base": {"uri": _uri_of(base), "sha256": base_sha},
            "task_vector": task_vector,
        }
        return publish_expert(store, prefix, files, weights_sha, skill=skill, record=record)


def _uri_of(source: str | Path) -> str:
    if isinstance(source, Path) or not is_uri(str(source)):
        path = local_path(source)
        if path is not None and path.exists():
            return str(path.absolute())
    return str(source)


def _import_adapter(src_dir: Path, base_dir: Path, out: Path, label: str, device):
    from peft import PeftModel

    model = load_causal_lm(base_dir, torch.float32, device)
    try:
        with quiet_peft():
            peft_model = PeftModel.from_pretrained(model, str(src_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        raise ModelMismatchError(
            f"expert {label}: the LoRA adapter does not fit the base: {str(exc)[:400]}"
        ) from None
    lora = lora_modules(peft_model)
    if not lora:
        raise ModelMismatchError(f"expert {label}: the adapter holds no LoRA module")
    base_folder = SafetensorsFolder(base_dir)
    task_vector = write_lora_factors(out / FACTORS_FILE, lora, base_folder)
    with quiet_peft():
        merged = peft_model.merge_and_unload()
    weights = out / WEIGHTS_FILE
    sha = write_expert_weights(weights, base_folder, state_getter(merged))
    del merged, peft_model, model
    files = {**_base_side_files(base_dir), WEIGHTS_FILE: weights}
    return files, sha, task_vector


def copy_side_files(base_dir: Path, dest: Path) -> dict[str, Path]:
    files = {}
    for name, path in _base_side_files(base_dir).items():
        files[name] = dest / name
        shutil.copyfile(path, files[name])
    return files


__all__ = [
    "EXPERT_KIND",
    "LoraWeights",
    "PublishedExpert",
    "import_expert",
    "lora_modules",
    "merge_lora",
    "published_expert",
]
