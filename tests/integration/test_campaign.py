"""A tiny random Llama through seed -> breed -> materialise -> archive insert, for real."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cycleqd import probe_world
from cycleqd.campaign import Campaign, breed
from cycleqd.config import parse_config
from cycleqd.genome import Genome, Mutation
from cycleqd.materialize import Materializer
from cycleqd.state import CampaignStore


def _config(world: dict, **overrides) -> dict:
    config = probe_world.default_config(world, generations=overrides.pop("generations", 6))
    config.update(overrides)
    return config


def _campaign(world, evaluator, root, **overrides) -> Campaign:
    return Campaign(parse_config(_config(world, **overrides)), CampaignStore(root), evaluator)


def _full(folder: str) -> dict[str, torch.Tensor]:
    return load_file(f"{folder}/model.safetensors")


def test_seed_breed_materialise_insert(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path)
    campaign.seed()
    experts = campaign.book.expert_ids()
    # Each expert is its own skill's best (score 1.0 on its probes) and sits in its archive.
    for skill, gid in experts.items():
        assert campaign.archives[skill].best().genome_id == gid
        assert campaign.archives[skill].best().quality == pytest.approx(1.0)

    results = campaign.step()
    (child,) = results
    genome = campaign.book[child.genome_id]
    assert child.skill == campaign.config.skill_names[1]  # generation 1 optimises skill 1 mod 3
    assert set(genome.parents) <= set(experts.values())
    assert sum(genome.weights) == pytest.approx(1.0)
    assert child.scores is not None and all(0 <= v <= 1 for v in child.scores.values())
    for skill in child.entered:
        assert child.genome_id in {e.genome_id for e in campaign.archives[skill].cells.values()}

    # The materialised child equals the formula computed on whole state dicts.
    base = _full(tiny_world["base"])
    by_id = {gid: _full(tiny_world["experts"][s]) for s, gid in experts.items()}
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = base[name] + sum(
        w * (by_id[p][name] - base[name])
        for p, w in zip(genome.parents, genome.weights, strict=True)
    )
    tau = by_id[genome.mutation.expert][name] - base[name]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    from cycleqd.operators import uniform_factors

    r = uniform_factors(genome.mutation.seed, name, s.numel(), genome.mutation.scale)
    expected = expected + (u * (s * r)) @ vh
    got = campaign.materializer.tensor(child.genome_id, name)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    # Norms are never mutated: they are the plain merge.
    norm = "model.layers.0.input_layernorm.weight"
    plain = base[norm] + sum(
        w * (by_id[p][norm] - base[norm])
        for p, w in zip(genome.parents, genome.weights, strict=True)
    )
    torch.testing.assert_close(campaign.materializer.tensor(child.genome_id, norm), plain)


@pytest.mark.parametrize("kind", ["svd", "svd_expert", "gaussian", "none"])
def test_same_seed_same_run(tiny_world, probe_evaluator, tmp_path, kind):
    runs = []
    for name in ("a", "b"):
        campaign = _campaign(
            tiny_world, probe_evaluator, tmp_path / name, generations=5, mutation={"kind": kind}
        )
        campaign.run()
        runs.append(campaign)
    assert runs[0].archives == runs[1].archives
    assert [h.genome_id for h in runs[0].history] == [h.genome_id for h in runs[1].history]
    # Something was actually bred and archived beyond the experts.
    assert len(runs[0].archives.genome_ids()) > 3


def test_other_seed_other_children(tiny_world, probe_evaluator, tmp_path):
    a = _campaign(tiny_world, probe_evaluator, tmp_path / "a", generations=3, seed=1)
    b = _campaign(tiny_world, probe_evaluator, tmp_path / "b", generations=3, seed=2)
    a.run()
    b.run()
    assert [h.genome_id for h in a.history[3:]] != [h.genome_id for h in b.history[3:]]


def test_paper_svd_elites_are_stored_and_reread(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(
        tiny_world, probe_evaluator, tmp_path, generations=6, mutation={"kind": "svd"}
    )
    campaign.run()
    children = {g for g in campaign.archives.genome_ids() if campaign.book[g].kind == "child"}
    assert children, "the paper mutation bred no elite in 6 generations"
    # Off the experts' span: every archived child has stored weights, nothing else is kept.
    assert set(campaign.store.stored_models()) == children
    # A child bred from compact parents can be rebuilt from base + experts alone, and the
    # rebuild is bit-identical to what was stored.
    experts_only = Materializer(campaign.book, campaign._sources.get)
    name = "model.layers.1.mlp.down_proj.weight"
    rebuildable = [
        g
        for g in children
        if all(campaign.book.linear_form(p) is not None for p in campaign.book[g].parents)
    ]
    assert rebuildable
    for gid in rebuildable:
        stored = campaign.store.open_model(gid)
        assert torch.equal(experts_only.tensor(gid, name), stored.get(name))


def test_same_recipe_bit_identical(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path)
    e = list(campaign.book.expert_ids().values())
    gid = campaign.book.add(Genome("child", (e[0], e[2]), (0.7, 0.3), Mutation("svd", 5, 1.5)))
    first = dict(campaign.materializer.tensors(gid))
    fresh = Materializer(campaign.book, campaign._resolve)
    second = dict(fresh.tensors(gid))
    assert first.keys() == second.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_equals_uninterrupted(tiny_world, probe_evaluator, tmp_path):
    whole = _campaign(tiny_world, probe_evaluator, tmp_path / "whole", generations=8)
    whole.run()
    part = _campaign(tiny_world, probe_evaluator, tmp_path / "part", generations=4)
    part.run()
    part.close()
    resumed = _campaign(tiny_world, probe_evaluator, tmp_path / "part", generations=8)
    assert resumed.generation == 4
    resumed.run()
    assert resumed.archives == whole.archives
    assert resumed.book.to_list() == whole.book.to_list()


def test_resume_refuses_a_changed_config(tiny_world, probe_evaluator, tmp_path):
    with _campaign(tiny_world, probe_evaluator, tmp_path, generations=1) as campaign:
        campaign.run()
    with pytest.raises(Exception, match="only `generations` may change"):
        _campaign(tiny_world, probe_evaluator, tmp_path, generations=1, seed=9)


def test_non_finite_child_is_rejected_never_archived(tiny_world, probe_evaluator, tmp_path):
    # sigma=1e39 overflows float32: every child's weights become Inf.
    campaign = _campaign(
        tiny_world,
        probe_evaluator,
        tmp_path,
        generations=3,
        mutation={"kind": "gaussian", "sigma": 1e39},
    )
    campaign.run()
    bred = [h for h in campaign.history if h.generation > 0]
    assert len(bred) == 3 and all(h.scores is None and h.entered == [] for h in bred)
    assert campaign.archives.genome_ids() == set(campaign.book.expert_ids().values())
    assert campaign.store.stored_models() == []


def test_population_breeds_p_children_per_generation(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path, population=3, generations=2)
    campaign.seed()
    children = breed(campaign.config, campaign.book, campaign.archives, 1)
    assert len(children) == 3 and len({c.id for c in children}) == 3
    assert {c.skill for c in children} == {campaign.config.skill_names[1]}


def test_without_the_cycle_every_generation_breeds_for_the_mean_and_resumes(
    tiny_world, probe_evaluator, tmp_path
):
    options = {"objective": "mean", "mutation": {"kind": "svd", "w_max": 1.5}}
    whole = _campaign(tiny_world, probe_evaluator, tmp_path / "whole", generations=6, **options)
    whole.run()
    assert whole.archives.names == ["mean"]
    bred = [h for h in whole.history if h.generation > 0]
    assert len(bred) == 6 and {h.skill for h in bred} == {"mean"}
    for elite in whole.archives["mean"].cells.values():
        assert elite.quality == pytest.approx(np.mean(list(elite.scores.values())))
    # The paper's final rule over one archive is that archive's best elite.
    gid, _ = whole.finalize()
    best = whole.archives["mean"].best()
    assert whole.book[gid].parents == (best.genome_id,) and whole.book[gid].weights == (1.0,)
    part = _campaign(tiny_world, probe_evaluator, tmp_path / "part", generations=3, **options)
    part.run()
    part.close()
    resumed = _campaign(tiny_world, probe_evaluator, tmp_path / "part", generations=6, **options)
    resumed.run()
    assert resumed.archives == whole.archives


def test_final_model_is_softmax_merge_of_best_elites(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path, generations=4)
    campaign.run()
    gid, scores = campaign.finalize()
    final = campaign.book[gid]
    bests = [campaign.archives[s].best() for s in campaign.config.skill_names]
    assert final.parents == tuple(b.genome_id for b in bests)
    q = np.array([b.quality for b in bests])
    np.testing.assert_allclose(final.weights, np.exp(q) / np.exp(q).sum())
    assert scores is not None
    sha = campaign.export(gid)
    exported = campaign.store.open_model(gid, "exports")
    name = "lm_head.weight"
    assert torch.equal(exported.get(name), campaign.materializer.tensor(gid, name))
    assert len(sha) == 64


@pytest.mark.parametrize("kind", ["svd_expert", "svd"])
def test_best_mean_final_is_the_best_generalist_with_its_weights(
    tiny_world, probe_evaluator, tmp_path, kind
):
    campaign = _campaign(
        tiny_world,
        probe_evaluator,
        tmp_path,
        generations=4,
        mutation={"kind": kind},
        final={"method": "best_mean"},
    )
    campaign.run()
    gid, scores = campaign.finalize()
    elites = [e for s in campaign.config.skill_names for e in campaign.archives[s].cells.values()]
    best = max(sum(e.scores.values()) for e in elites)
    (parent,) = campaign.book[gid].parents
    assert campaign.book[gid].weights == (1.0,)
    picked = next(e for e in elites if e.genome_id == parent)
    assert sum(picked.scores.values()) == best
    assert scores == picked.scores  # the same weights, so the same scores
    for name in ("lm_head.weight", "model.layers.0.self_attn.q_proj.weight"):
        torch.testing.assert_close(
            campaign.materializer.tensor(gid, name),
            campaign.materializer.tensor(parent, name),
            rtol=0,
            atol=1e-6,
        )


def test_bounded_factor_cache_gives_the_same_weights(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path)
    e = list(campaign.book.expert_ids().values())
    gid = campaign.book.add(
        Genome("child", (e[0], e[1]), (0.4, 0.6), Mutation("svd_expert", 3, 0.1, e[2]))
    )
    unbounded = dict(campaign.materializer.tensors(gid))
    tiny_cache = Materializer(campaign.book, campaign._resolve, factor_cache_bytes=64 << 10)
    for _ in range(2):  # the second pass recomputes evicted factors
        bounded = dict(tiny_cache.tensors(gid))
        assert all(torch.equal(unbounded[k], bounded[k]) for k in unbounded)
    assert tiny_cache._factor_bytes <= 64 << 10


def test_exported_model_loads_with_from_pretrained(tiny_world, probe_evaluator, tmp_path):
    from transformers import LlamaForCausalLM

    with _campaign(tiny_world, probe_evaluator, tmp_path, generations=2) as campaign:
        campaign.run()
        gid, _ = campaign.finalize()
        campaign.export(gid)
        folder = tmp_path / "exports" / gid  # a local store: the folder itself
        model = LlamaForCausalLM.from_pretrained(folder)
        name = "model.layers.0.mlp.up_proj.weight"
        assert torch.equal(model.state_dict()[name], campaign.materializer.tensor(gid, name))


def test_stored_low_rank_factors_give_the_same_child(tiny_world, probe_evaluator, tmp_path):
    """Experts that come with their task-vector factors (written at fine-tuning time, rank k)
    are never decomposed again, and the child equals the one built from a fresh full SVD."""
    import shutil

    from cycleqd.finetune.factors import full_factors, write_factors
    from cycleqd.weights import FACTORS_FILE, SafetensorsFolder

    experts = dict(tiny_world["experts"])
    copy = tmp_path / "expert-with-factors"
    shutil.copytree(experts["probe_c"], copy)
    base, expert = SafetensorsFolder(tiny_world["base"]), SafetensorsFolder(copy)
    targets = {n: expert.specs()[n].shape for n in expert.names() if "proj" in n}
    # probe_world.build_expert adds rank-4 task vectors: rank-4 factors hold all of them.
    (copy / "task_vector").mkdir()
    write_factors(
        copy / FACTORS_FILE,
        {n: (shape, 4) for n, shape in targets.items()},
        lambda n: full_factors(expert.get(n) - base.get(n), rank=4),
        kind="full",
    )
    world = {"base": tiny_world["base"], "experts": {**experts, "probe_c": str(copy)}}
    fresh = _campaign(tiny_world, probe_evaluator, tmp_path / "fresh")
    stored = _campaign(world, probe_evaluator, tmp_path / "stored")
    children = []
    for campaign in (fresh, stored):
        e = campaign.book.expert_ids()
        mutation = Mutation("svd_expert", 11, 0.5, e["probe_c"])
        children.append(
            campaign.book.add(Genome("child", (e["probe_a"], e["probe_b"]), (0.5, 0.5), mutation))
        )
    for name in targets:
        torch.testing.assert_close(
            stored.materializer.tensor(children[1], name),
            fresh.materializer.tensor(children[0], name),
            rtol=1e-4,
            atol=1e-5,
        )
    assert stored.materializer._factors == {}  # nothing was decomposed
    assert fresh.materializer._factors  # the other path did decompose


def test_timings_split_materialisation_evaluation_and_commit(tiny_world, probe_evaluator, tmp_path):
    campaign = _campaign(tiny_world, probe_evaluator, tmp_path, population=2, generations=2)
    campaign.seed()
    campaign.step()
    campaign.step()
    timings = campaign.timings
    assert timings["models"] == 3 + 2 * 2  # the experts, then two children per generation
    assert timings["materialize_s"] > 0 and timings["evaluate_s"] > 0
    assert timings["commit_s"] > 0


def test_children_written_into_the_evaluators_model(tiny_world, probe_evaluator, tmp_path):
    """An evaluator that offers its model's tensors gets children materialised into them (no
    copy, no allocation), with the same scores as one that copies."""
    buffers = probe_evaluator.weight_buffers()
    pointers = {t.data_ptr() for t in buffers.values()}
    received: list[set[int]] = []

    class Recording:
        def __init__(self, offer: bool):
            self.offer = offer

        def __getattr__(self, name):  # weight_buffers only when offered
            if name == "weight_buffers" and self.offer:
                return probe_evaluator.weight_buffers
            raise AttributeError(name)

        def evaluate(self, genome_id, tensors):
            tensors = list(tensors)
            received.append({t.data_ptr() for _, t in tensors})
            return probe_evaluator.evaluate(genome_id, tensors)

    runs = []
    for offer in (True, False):
        received.clear()
        campaign = _campaign(tiny_world, Recording(offer), tmp_path / str(offer), generations=4)
        campaign.run()
        runs.append(campaign)
        children = received[3:]  # after the three experts (stored weights, read as they are)
        assert children and all((r <= pointers) == offer for r in children)
    assert runs[0].archives == runs[1].archives


def test_paper_svd_non_elites_write_nothing(tiny_world, probe_evaluator, tmp_path, monkeypatch):
    """Children off the experts' span are published to the store only when they could enter
    an archive; the others are scored from scratch space and leave no bytes behind."""
    import cycleqd.state

    published: list[str] = []
    real = cycleqd.state.publish_model

    def recording(store, prefix, *args, **kwargs):
        published.append(prefix.rsplit("/", 1)[-1])
        return real(store, prefix, *args, **kwargs)

    monkeypatch.setattr(cycleqd.state, "publish_model", recording)
    skills = [{"name": s, "bc_min": 0.0, "bc_max": 1.0, "bins": 3} for s in probe_world.SKILLS]
    campaign = _campaign(
        tiny_world,
        probe_evaluator,
        tmp_path,
        generations=8,
        population=2,
        skills=skills,  # 9 cells per archive: they fill, and later children are refused
        mutation={"kind": "svd"},
    )
    campaign.run()
    bred = [h for h in campaign.history if h.generation > 0]
    archived = campaign.archives.genome_ids()
    assert any(h.entered for h in bred)
    assert {h.genome_id for h in bred if h.entered} <= set(published)
    assert set(published) <= {h.genome_id for h in bred}
    refused = [h.genome_id for h in bred if h.genome_id not in published]
    assert refused, "every child could enter: the test shows nothing"
    for gid in refused:
        assert gid not in archived
        assert campaign.store.get_json(f"evaluations/{gid}.json")["sha256"] is None
