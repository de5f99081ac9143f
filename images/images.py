"""The CycleQD container images, as `images/images.yaml` defines them (the one place).

    >>> image_for("evaluator")
    'ghcr.io/cycleqd/cycleqd-evaluator:0.1.0'

`image_for(name)` gives the pinned reference of a built image (`cpu-tools`, `trainer`,
`evaluator`, `mlflow-server`: `<registry>/<repository>:<tag>[@<digest>]`) or of a third-party
image the manifests run (`postgres`, `seaweedfs`). The registry can be redirected for a fork or
a private mirror with the environment variable CYCLEQD_IMAGE_REGISTRY (or `registry=`); the tag
is always the package version recorded in images.yaml. A reference is never `latest` nor
untagged: loading images.yaml fails with what to fix otherwise.

Also a small command line for `images/build.sh` (stdlib only: PyYAML is used when it is
installed, else a reader for the plain subset of YAML that images.yaml is written in):

    python3 images/images.py list                 # the built images' names
    python3 images/images.py ref NAME             # image_for(NAME)
    python3 images/images.py dockerfile NAME      # repository-relative Dockerfile path
    python3 images/images.py build-args NAME      # KEY=VALUE lines for --build-arg
    python3 images/images.py bases                # every base and third-party reference
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

IMAGES_YAML = Path(__file__).resolve().with_name("images.yaml")
REGISTRY_ENV = "CYCLEQD_IMAGE_REGISTRY"

# Build args every image gets from the top of images.yaml (besides its own build_args).
COMMON_BUILD_ARGS = ("VERSION", "SOURCE_URL")
# Build args that images/build.sh adds from the checkout (not versions: they label the image).
BUILD_SH_ARGS = ("VCS_REF", "CREATED")

_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_NAME_RE = re.compile(rf"^{_COMPONENT}(?::[0-9]+)?(?:/{_COMPONENT})*$")
_TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_ARG_RE = re.compile(r"^[A-Z][A-Z0-9_]*$")


class ImagesConfigError(ValueError):
    """images.yaml is malformed; the message says which entry and what to change."""


@dataclass(frozen=True)
class Reference:
    name: str  # registry/path, e.g. docker.io/library/postgres
    tag: str | None
    digest: str | None

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def parse_reference(ref: str) -> Reference:
    """Split `name[:tag][@sha256:...]`; raises ImagesConfigError on a malformed reference."""
    if not isinstance(ref, str) or not ref or ref != ref.strip():
        raise ImagesConfigError(f"not an image reference: {ref!r}")
    rest, _, digest = ref.partition("@")
    name, tag = rest, None
    last = rest.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = rest.rsplit(":", 1)
    if not _NAME_RE.match(name):
        raise ImagesConfigError(f"{ref!r}: invalid image name {name!r}")
    if tag is not None and not _TAG_RE.match(tag):
        raise ImagesConfigError(f"{ref!r}: invalid tag {tag!r}")
    if digest and not _DIGEST_RE.match(digest):
        raise ImagesConfigError(f"{ref!r}: the digest must be sha256:<64 hex digits>")
    return Reference(name, tag, digest or None)


def is_pinned(ref: str) -> bool:
    """True for a reference with an explicit tag other than `latest` (a digest may follow)."""
    try:
        parsed = parse_reference(ref)
    except ImagesConfigError:
        return False
    return bool(parsed.tag) and parsed.tag != "latest"


# -- reading images.yaml ------------------------------------------------------------------------


def _strip_comment(line: str) -> str:
    quote = None
    for i, char in enumerate(line):
        if quote:
            if char == quote:
                quote = None
        elif char in "\"'":
            quote = char
        elif char == "#" and (i == 0 or line[i - 1] in " \t"):
            return line[:i]
    return line


def _scalar(text: str, where: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        return text[1:-1]
    if text[:1] in ("[", "{", "&", "*", "!", "|", ">", "-"):
        raise ImagesConfigError(f"{where}: only plain mappings of scalars are supported")
    return text


def parse_simple_yaml(text: str) -> dict[str, Any]:
    """Nested mappings of string scalars (what images.yaml is): used where PyYAML is missing."""
    root: dict[str, Any] = {}
    # (indent of this mapping's keys or None until its first key, mapping, indent of its parent key)
    stack: list[list[Any]] = [[0, root, -1]]
    for number, raw in enumerate(text.splitlines(), 1):
        line = _strip_comment(raw).rstrip()
        if not line.strip():
            continue
        where = f"images.yaml line {number}"
        body = line.lstrip(" ")
        indent = len(line) - len(body)
        if body.startswith("\t") or "\t" in line[:indent]:
            raise ImagesConfigError(f"{where}: indent with spaces, not tabs")
        if stack[-1][0] is None:  # the first key of a mapping just opened
            if indent <= stack[-1][2]:
                raise ImagesConfigError(f"{where}: the key above has no value")
            stack[-1][0] = indent
        while indent < stack[-1][0]:
            stack.pop()
        if indent != stack[-1][0]:
            raise ImagesConfigError(f"{where}: inconsistent indentation")
        key, sep, value = body.partition(":")
        if not sep or not key.strip() or (value and not value.startswith(" ")):
            raise ImagesConfigError(f"{where}: expected `key: value`")
        key = _scalar(key, where)
        mapping = stack[-1][1]
        if key in mapping:
            raise ImagesConfigError(f"{where}: duplicate key {key!r}")
        if value.strip():
            mapping[key] = _scalar(value, where)
        else:
            child: dict[str, Any] = {}
            mapping[key] = child
            stack.append([None, child, indent])
    if stack[-1][0] is None:
        raise ImagesConfigError("images.yaml: the last key has no value")
    return root


def _read_yaml(path: Path) -> Any:
    text = path.read_text()
    try:
        import yaml
    except ImportError:  # build hosts without PyYAML
        return parse_simple_yaml(text)
    return yaml.safe_load(text)


def _require_str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ImagesConfigError(
            f"images.yaml: {where} must be a non-empty quoted string, got {value!r}"
        )
    return value


def load(path: str | Path | None = None) -> dict[str, Any]:
    """images.yaml, validated: raises ImagesConfigError saying what to fix."""
    path = Path(path) if path is not None else IMAGES_YAML
    data = _read_yaml(path)
    if not isinstance(data, dict):
        raise ImagesConfigError(f"{path}: expected a mapping at the top")
    for key in ("registry", "tag", "source"):
        _require_str(data.get(key), key)
    if not _TAG_RE.match(data["tag"]) or data["tag"] == "latest":
        raise ImagesConfigError(f"images.yaml: tag {data['tag']!r} must be a version, not latest")
    images = data.get("images")
    if not isinstance(images, dict) or not images:
        raise ImagesConfigError("images.yaml: `images` must map image names to their entries")
    for name, entry in images.items():
        if not isinstance(entry, dict):
            raise ImagesConfigError(f"images.yaml: images.{name} must be a mapping")
        for key in ("repository", "dockerfile", "description"):
            _require_str(entry.get(key), f"images.{name}.{key}")
        args = entry.get("build_args")
        if not isinstance(args, dict) or "BASE_IMAGE" not in args:
            raise ImagesConfigError(f"images.yaml: images.{name}.build_args needs BASE_IMAGE")
        for arg, value in args.items():
            if not _ARG_RE.match(str(arg)) or arg in COMMON_BUILD_ARGS + BUILD_SH_ARGS:
                raise ImagesConfigError(
                    f"images.yaml: images.{name}.build_args: {arg!r} is not an allowed name "
                    f"(UPPER_CASE; {', '.join(COMMON_BUILD_ARGS + BUILD_SH_ARGS)} are reserved)"
                )
            _require_str(value, f"images.{name}.build_args.{arg}")
        if not is_pinned(args["BASE_IMAGE"]):
            raise ImagesConfigError(
                f"images.yaml: images.{name}.build_args.BASE_IMAGE {args['BASE_IMAGE']!r} "
                "must name an explicit tag other than latest"
            )
        if entry.get("digest") is not None and not _DIGEST_RE.match(str(entry["digest"])):
            raise ImagesConfigError(f"images.yaml: images.{name}.digest must be sha256:<hex>")
    third = data.get("third_party") or {}
    if not isinstance(third, dict):
        raise ImagesConfigError("images.yaml: `third_party` must map names to references")
    for name, ref in third.items():
        _require_str(ref, f"third_party.{name}")
        if name in images:
            raise ImagesConfigError(f"images.yaml: {name!r} is both built and third_party")
        if not is_pinned(ref):
            raise ImagesConfigError(
                f"images.yaml: third_party.{name} {ref!r} must name an explicit tag other "
                "than latest"
            )
    return data


def names(path: str | Path | None = None) -> list[str]:
    """The images built from this repository (each has a Dockerfile)."""
    return list(load(path)["images"])


def third_party_names(path: str | Path | None = None) -> list[str]:
    return list(load(path).get("third_party") or {})


def _entry(name: str, data: dict[str, Any]) -> dict[str, Any]:
    try:
        return data["images"][name]
    except KeyError:
        known = sorted([*data["images"], *(data.get("third_party") or {})])
        raise KeyError(f"no image {name!r} in images.yaml; known: {', '.join(known)}") from None


def image_for(name: str, *, registry: str | None = None, path: str | Path | None = None) -> str:
    """The pinned reference of image `name` (built here, or third-party)."""
    data = load(path)
    third = data.get("third_party") or {}
    if name in third:
        return third[name]
    entry = _entry(name, data)
    registry = (registry or os.environ.get(REGISTRY_ENV) or data["registry"]).rstrip("/")
    ref = f"{registry}/{entry['repository']}:{data['tag']}"
    if entry.get("digest"):
        ref += f"@{entry['digest']}"
    parse_reference(ref)  # a bad registry override fails here, not at pull time
    return ref


def dockerfile(name: str, *, path: str | Path | None = None) -> str:
    """The Dockerfile of built image `name`, relative to the repository root."""
    return _entry(name, load(path))["dockerfile"]


def build_args(name: str, *, path: str | Path | None = None) -> dict[str, str]:
    """Every --build-arg of image `name` that images.yaml defines (versions, base image)."""
    data = load(path)
    args = dict(_entry(name, data)["build_args"])
    args["VERSION"] = data["tag"]
    args["SOURCE_URL"] = data["source"]
    return args


def base_images(path: str | Path | None = None) -> dict[str, str]:
    """Every external reference the images and manifests depend on, by name."""
    data = load(path)
    refs = {f"{n}:BASE_IMAGE": e["build_args"]["BASE_IMAGE"] for n, e in data["images"].items()}
    refs.update({f"third_party:{n}": r for n, r in (data.get("third_party") or {}).items()})
    return refs


def references(path: str | Path | None = None) -> dict[str, str]:
    """image_for() of every name: built images and third-party ones."""
    data = load(path)
    return {name: image_for(name, path=path) for name in [*data["images"], *data["third_party"]]}


# -- command line (images/build.sh) ----------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    usage = "usage: images.py {list | ref NAME | dockerfile NAME | build-args NAME | bases}"
    if not argv:
        print(usage, file=sys.stderr)
        return 2
    command, rest = argv[0], argv[1:]
    try:
        if command == "list" and not rest:
            print("\n".join(names()))
        elif command == "bases" and not rest:
            print("\n".join(dict.fromkeys(base_images().values())))
        elif command == "ref" and len(rest) == 1:
            print(image_for(rest[0]))
        elif command == "dockerfile" and len(rest) == 1:
            print(dockerfile(rest[0]))
        elif command == "build-args" and len(rest) == 1:
            print("\n".join(f"{k}={v}" for k, v in build_args(rest[0]).items()))
        else:
            print(usage, file=sys.stderr)
            return 2
    except (ImagesConfigError, KeyError) as exc:
        print(f"images.py: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
