#!/usr/bin/env bash
# Build (and push) the CycleQD images named in images/images.yaml, from the repository root.
#
# usage: images/build.sh [--push] [--check] [--dry-run] [--platform PLATFORM] [NAME ...]
#
#   NAME         images to build (default: every image in images.yaml)
#   --push       push each image after building it and print its pushed digest
#   --check      only resolve every base and third-party image in the registry and print its
#                digest (paste `tag@sha256:...` into images.yaml to pin by content)
#   --dry-run    print the docker commands instead of running them
#   --platform   passed to `docker build` (default: linux/amd64)
#
# Tags, base images and versions all come from images/images.yaml (read by images/images.py:
# python3, with PyYAML if installed). CYCLEQD_IMAGE_REGISTRY redirects the pushes (a fork or a
# private mirror); compile the pipeline with the same variable so that it names those images.
# Needs Docker with BuildKit (the per-Dockerfile .dockerignore files). No secret is passed to a
# build: the images hold no credentials.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
DOCKER="${DOCKER:-docker}"

images() { "$PYTHON" images/images.py "$@"; }

push=0
check=0
dry_run=0
platform="linux/amd64"
names=()
while [ $# -gt 0 ]; do
    case "$1" in
        --push) push=1 ;;
        --check) check=1 ;;
        --dry-run) dry_run=1 ;;
        --platform)
            [ $# -ge 2 ] || { echo "build.sh: --platform needs a value" >&2; exit 2; }
            platform="$2"
            shift
            ;;
        --platform=*) platform="${1#--platform=}" ;;
        -h | --help)
            sed -n '2,19p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        -*)
            echo "build.sh: unknown option $1 (see --help)" >&2
            exit 2
            ;;
        *) names+=("$1") ;;
    esac
    shift
done

run() {
    if [ "$dry_run" = 1 ]; then
        printf '%q ' "$@"
        printf '\n'
    else
        "$@"
    fi
}

if [ "$check" = 1 ]; then
    while IFS= read -r ref; do
        if [ "$dry_run" = 1 ]; then
            run "$DOCKER" buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}'
        else
            digest="$("$DOCKER" buildx imagetools inspect "$ref" --format '{{json .Manifest.Digest}}')"
            echo "$ref -> ${digest//\"/}"
        fi
    done < <(images bases)
    exit 0
fi

if [ ${#names[@]} -eq 0 ]; then
    while IFS= read -r name; do names+=("$name"); done < <(images list)
fi

vcs_ref="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain 2>/dev/null || true)" ]; then
    vcs_ref="${vcs_ref}-dirty"
fi
created="$(date -u +%Y-%m-%dT%H:%M:%SZ)"

for name in "${names[@]}"; do
    ref="$(images ref "$name")"
    dockerfile="$(images dockerfile "$name")"
    args=()
    while IFS= read -r kv; do
        args+=(--build-arg "$kv")
    done < <(images build-args "$name")
    echo "== $name -> $ref" >&2
    run env DOCKER_BUILDKIT=1 "$DOCKER" build \
        --file "$dockerfile" \
        --platform "$platform" \
        "${args[@]}" \
        --build-arg "VCS_REF=$vcs_ref" \
        --build-arg "CREATED=$created" \
        --tag "$ref" \
        .
    if [ "$push" = 1 ]; then
        run "$DOCKER" push "$ref"
        if [ "$dry_run" = 0 ]; then
            echo "$name pushed: $("$DOCKER" inspect --format '{{index .RepoDigests 0}}' "$ref")"
        fi
    fi
done
