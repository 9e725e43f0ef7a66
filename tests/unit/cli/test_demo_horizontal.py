"""`secure-split demo sequential|splitfed`: what the horizontal demos generate, before any peer runs.

Each variant must write a deployment that loads, a policy that every party signed and that
passes `secure-split policy check` and the peers' startup check, and one data file per owner
holding its shard only: shards disjoint, together every digit; non-IID shards few labels each.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from secure_split.cli.demo import _owners_row, baseline_deployment, run_demo
from secure_split.config import horizontal_owners, load_deployment, load_peer_config
from secure_split.engine.data import digits, load_peer_data
from secure_split.engine.models import derive_seed, horizontal_seed_names
from secure_split.errors import ConfigError
from secure_split.policy import check_startup, load_policy, required_flows
from secure_split.scenarios import HORIZONTAL_ACCURACY_TOLERANCE, SCENARIOS, generate, owner_shards

N_DIGITS = 1797

VARIANTS: list[tuple[str, dict[str, Any]]] = [
    ("sequential", {}),
    ("sequential", {"handoff": "direct"}),
    ("splitfed", {}),
    ("splitfed", {"he": True}),
    ("splitfed", {"handoff": "direct", "non_iid": True}),
    ("sequential", {"labels": "owners"}),
    ("splitfed", {"labels": "owners", "he": True}),
]


def _ids(t: Any) -> set[int]:
    return {int(v) for v in np.asarray(t)}


@pytest.mark.parametrize(("scenario", "options"), VARIANTS, ids=lambda v: str(v))
def test_each_variant_generates_a_deployment_whose_signed_policy_passes_the_checks(
    tmp_path: Path, scenario: str, options: dict[str, Any]
) -> None:
    plan = SCENARIOS[scenario](1, owners=3, **options)
    gen = generate(plan, tmp_path)
    dep = load_deployment(gen.deployment)
    spec = dep.spec
    assert spec.training.schedule == scenario
    assert spec.training.handoff == options.get("handoff", "relay")
    if scenario == "splitfed":
        assert spec.training.average == ("he" if options.get("he") else "sealed")
    assert list(horizontal_owners(spec)) == ["owner_1", "owner_2", "owner_3"]
    check_startup(load_policy(gen.policy), dep)  # raises PolicyError on any problem
    from secure_split.cli.main import app

    result = CliRunner().invoke(app, ["policy", "check", str(gen.policy), "--deployment", str(gen.deployment)])
    assert result.exit_code == 0, result.output
    assert "OK: 0 errors" in result.output
    # Owners' weights move only as sealed `encrypted_weights`; never plaintext to the coordinator.
    kinds_to_coordinator = {f.kind for f in required_flows(dep) if f.receiver == spec.coordinator}
    assert "encrypted_weights" in kinds_to_coordinator or options.get("handoff") == "direct"
    for cfg_path in gen.peer_configs.values():
        assert load_peer_config(cfg_path).spec.threads == 1, "one torch thread per peer process"


@pytest.mark.parametrize("non_iid", [False, True])
@pytest.mark.parametrize("labels", ["holder", "owners"])
def test_each_owner_gets_only_its_shard_and_the_shards_cover_every_digit(
    tmp_path: Path, labels: str, non_iid: bool
) -> None:
    gen = generate(SCENARIOS["splitfed"](1, owners=4, labels=labels, non_iid=non_iid), tmp_path)
    shards = []
    for k in range(1, 5):
        data = load_peer_data(tmp_path / "data" / f"owner_{k}.safetensors")
        assert data.features is not None and len(data) > 0
        assert (set(data.labels) == {"labels"}) == (labels == "owners"), "labels stay with their holder"
        shards.append(_ids(data.ids))
    assert sum(len(s) for s in shards) == N_DIGITS, "disjoint"
    assert set().union(*shards) == set(range(N_DIGITS)), "together every digit"
    coordinator = "label_holder" if labels == "holder" else "server"
    coord_data = tmp_path / "data" / f"{coordinator}.safetensors"
    if labels == "holder":
        held = load_peer_data(coord_data)
        assert held.features is None and _ids(held.ids) == set(range(N_DIGITS)) and set(held.labels) == {"labels"}
    else:
        assert not coord_data.exists(), "the U-shaped server holds no data at all"
        assert "data" not in yaml.safe_load(gen.peer_configs["server"].read_text())


def test_iid_shards_are_a_seeded_random_partition_of_near_equal_size() -> None:
    _, _, y = digits()
    shards = owner_shards(y, 5, non_iid=False)
    again = owner_shards(y, 5, non_iid=False)
    assert all(np.array_equal(a, b) for a, b in zip(shards, again, strict=True)), "seeded"
    assert sorted(len(s) for s in shards) == [359, 359, 359, 360, 360]
    assert not np.array_equal(shards[0], np.arange(360)), "shuffled, not cut in file order"
    for s in shards:
        assert len(np.unique(np.asarray(y)[s])) == 10, "an IID shard holds every class"


@pytest.mark.parametrize("owners", [5, 20])
def test_non_iid_shards_hold_few_labels_each(owners: int) -> None:
    _, _, y = digits()
    yy = np.asarray(y)
    shards = owner_shards(y, owners, non_iid=True)
    rows = np.concatenate(shards)
    assert len(rows) == N_DIGITS and len(np.unique(rows)) == N_DIGITS
    per_owner = [len(np.unique(yy[s])) for s in shards]
    # 2 label-sorted shards each; a shard no longer than a class spans at most 3 of them (it
    # may hold a whole small class and the ends of its neighbours), mostly 1 or 2.
    assert max(per_owner) <= 6, per_owner
    assert np.mean(per_owner) <= 4, per_owner
    iid = [len(np.unique(yy[s])) for s in owner_shards(y, owners, non_iid=False)]
    assert min(iid) > max(per_owner), "an IID shard holds more classes than any non-IID one"


def test_owners_are_in_natural_order_and_start_from_the_baselines_weights(tmp_path: Path) -> None:
    plan = SCENARIOS["sequential"](1, owners=12)
    gen = generate(plan, tmp_path)
    dep = load_deployment(gen.deployment)
    owners = list(horizontal_owners(dep.spec))
    assert owners[:3] == ["owner_1", "owner_2", "owner_3"] and owners[-1] == "owner_12"
    base = baseline_deployment(plan, gen)
    assert base.path == tmp_path / "baseline.yaml"
    assert base.spec.training.schedule == "sync" and sorted(base.spec.peers) == ["label_holder", "owner_1"]
    assert [e.name for e in base.spec.edges] == ["bottom_1->top"]
    seeds = horizontal_seed_names(dep)
    seed = dep.spec.training.seed
    assert {derive_seed(seed, seeds[f"bottom_{k}"]) for k in range(1, 13)} == {derive_seed(seed, "bottom_1")}
    assert dep.spec.segments["bottom_7"].model == base.spec.segments["bottom_1"].model
    assert base.spec.training.epochs == dep.spec.training.epochs
    assert base.spec.training.batch_size == dep.spec.training.batch_size


def test_u_shaped_baseline_is_head_middle_tail_once(tmp_path: Path) -> None:
    plan = SCENARIOS["splitfed"](1, owners=2, labels="owners")
    base = baseline_deployment(plan, generate(plan, tmp_path))
    assert [e.name for e in base.spec.edges] == ["head_1->middle", "middle->tail_1"]
    assert base.spec.coordinator == "server" and set(plan.baseline_features) == {"head_1"}
    assert set(plan.baseline_labels) == {"tail_1"}
    assert plan.tolerance == HORIZONTAL_ACCURACY_TOLERANCE


@pytest.mark.parametrize(
    ("scenario", "options", "names"),
    [
        ("sequential", {"he": True}, "--he"),
        ("splitfed", {"owners": 1}, "vanilla"),
        ("splitfed", {"labels": "everyone"}, "'holder'"),
        ("splitfed", {"handoff": "carrier_pigeon"}, "'relay'"),
    ],
)
def test_bad_horizontal_options_are_refused_with_advice(scenario: str, options: dict[str, Any], names: str) -> None:
    with pytest.raises(ConfigError) as exc:
        SCENARIOS[scenario](1, **options)
    assert names in str(exc.value)


def test_options_of_other_scenarios_are_refused_before_anything_is_generated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as exc:
        run_demo("vanilla", workdir=tmp_path / "w", epochs=1, summary=None, quiet=True, owners=5)
    assert "--owners" in str(exc.value) and "sequential" in str(exc.value)
    with pytest.raises(ConfigError, match="--hops"):
        run_demo("splitfed", workdir=tmp_path / "w", epochs=1, summary=None, quiet=True, hops=2)
    assert not (tmp_path / "w").exists()


def test_many_owners_show_as_one_row_with_min_and_max() -> None:
    rows = [{"name": f"owner_{k}", "status": "ok", "exit_code": 0, "bytes_sent": 1000 * k, "bytes_received": 2048,
             "messages_sent": k, "messages_received": 3} for k in range(1, 13)]
    rows[4].update(status="failed", exit_code=3)
    row = _owners_row(rows)
    assert row[0] == "12 owners"
    assert row[2] == "11/12 ok (failed: owner_5)"
    assert row[3] == "1000 B - 11.7 KiB"
    assert row[4] == "2.0 KiB - 2.0 KiB"
    assert row[5] == "1 - 12 / 3 - 3"


@pytest.mark.parametrize("labels", ["holder", "owners"])
def test_baseline_trains_on_all_owners_training_rows_and_tests_on_their_test_rows(
    tmp_path: Path, labels: str
) -> None:
    from secure_split.engine.baseline import train_centralized
    from secure_split.engine.schedule import split_train_test

    plan = SCENARIOS["splitfed"](1, owners=3, labels=labels)
    assert plan.baseline_split is not None
    train, test = plan.baseline_split
    assert len(np.intersect1d(train, test)) == 0 and len(train) + len(test) == N_DIGITS
    owner_1 = np.sort(np.asarray(plan.peers[0].ids))
    if labels == "holder":  # the label holder splits the ids it shares with owner_1 (PSI)
        own_test = split_train_test(owner_1, 0.2, 7)[1]
    else:  # the server splits owner_1's row positions; owner_1 maps them to its sorted ids
        own_test = owner_1[split_train_test(np.arange(len(owner_1)), 0.2, 7)[1]]
    assert np.isin(own_test, test).all()
    base = train_centralized(baseline_deployment(plan, generate(plan, tmp_path)), features=plan.baseline_features,
                             labels=plan.baseline_labels, ids=plan.baseline_ids, split=plan.baseline_split, epochs=0)
    assert np.array_equal(base["test_ids"], test) and np.array_equal(base["train_ids"], train)
    with pytest.raises(ConfigError, match="disjoint"):
        train_centralized(baseline_deployment(plan, generate(plan, tmp_path)), features=plan.baseline_features,
                          labels=plan.baseline_labels, ids=plan.baseline_ids, split=(train, train[:5]), epochs=0)


def test_too_many_owners_for_the_smallest_batch_are_refused_with_the_largest_n_that_works() -> None:
    from secure_split.engine.schedule import MIN_BATCH

    with pytest.raises(ConfigError) as exc:
        SCENARIOS["splitfed"](1, owners=100)
    assert "use at most 47 owners" in str(exc.value) and "min_batch" in str(exc.value)
    plan = SCENARIOS["splitfed"](1, owners=47)  # the largest N at test_fraction 0.2
    shards = [np.asarray(p.ids) for p in plan.peers if p.name.startswith("owner_")]
    assert min(round(len(s) * 0.2) for s in shards) >= MIN_BATCH
    wide = SCENARIOS["splitfed"](1, owners=100, test_fraction=0.5)  # what bench/many_owners.py runs
    assert wide.training["test_fraction"] == 0.5 and len(wide.peers) == 101


def test_only_iid_variants_carry_the_three_point_gate() -> None:
    assert SCENARIOS["sequential"](1, owners=3).tolerance == HORIZONTAL_ACCURACY_TOLERANCE == 0.03
    assert SCENARIOS["splitfed"](1, owners=3, non_iid=True).tolerance is None
    assert SCENARIOS["vanilla"](1).tolerance == 0.02


def _readme_demo_commands() -> list[list[str]]:
    import re
    import shlex

    readme = Path(__file__).resolve().parents[3] / "README.md"
    lines = re.findall(r"^secure-split demo (.+?)(?:\s+#.*)?$", readme.read_text(), flags=re.MULTILINE)
    return [shlex.split(line) for line in lines]


@pytest.mark.parametrize("argv", _readme_demo_commands(), ids=lambda a: " ".join(a))
def test_every_demo_command_in_the_readme_parses_and_plans(argv: list[str]) -> None:
    import typer

    from secure_split.cli.main import app
    from secure_split.scenarios import SCENARIO_OPTIONS

    demo = typer.main.get_command(app).commands["demo"]  # type: ignore[attr-defined]
    params = demo.make_context("demo", list(argv)).params
    scenario = params["scenario"]
    options = {k: v for k, v in params.items() if k in SCENARIO_OPTIONS.get(scenario, ()) and v not in (None, False)}
    given = {k for k, v in params.items() if k in ("hops", "owners", "non_iid", "labels", "handoff", "he")
             and v not in (None, False)}
    assert given <= set(options), f"options {given - set(options)} do not apply to {scenario}"
    plan = SCENARIOS[scenario](1, **options)
    assert plan.peers
