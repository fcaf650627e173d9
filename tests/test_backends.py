"""The backend pool: balancing policies, health marks and failover order, without sockets."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.backends import Backend, Pool


def backends(*weights: int, group: str | None = None) -> tuple[Backend, ...]:
    return tuple(
        Backend(f"b{i}", f"127.0.0.{i + 1}", 21, weight=w, group=group)
        for i, w in enumerate(weights)
    )


def spread(pool: Pool, sessions: int, **kwargs: object) -> Counter[str]:
    counts: Counter[str] = Counter()
    for _ in range(sessions):
        chosen = pool.choose(client="192.0.2.1", **kwargs)  # type: ignore[arg-type]
        assert chosen is not None
        counts[chosen.name] += 1
    return counts


@pytest.mark.parametrize(
    ("weights", "sessions", "expected"),
    [
        ((1, 1), 20, {"b0": 10, "b1": 10}),
        ((3, 1), 20, {"b0": 15, "b1": 5}),
        ((1, 2, 1), 8, {"b0": 2, "b1": 4, "b2": 2}),
        ((5,), 3, {"b0": 3}),
    ],
)
def test_round_robin_gives_each_backend_its_weight(
    weights: tuple[int, ...], sessions: int, expected: dict[str, int]
) -> None:
    assert spread(Pool(backends(*weights)), sessions) == expected


def test_round_robin_interleaves_rather_than_bursting() -> None:
    pool = Pool(backends(3, 1))
    order = [pool.choose(client="c") for _ in range(4)]
    assert [b.name for b in order if b is not None] == ["b0", "b0", "b1", "b0"]


def test_least_connections_prefers_the_least_loaded_per_weight() -> None:
    pool = Pool(backends(1, 2), balance="least_connections")
    pool.acquire("b0")
    pool.acquire("b1")
    # b0 carries 1 session per unit of weight, b1 one half.
    chosen = pool.choose(client="c")
    assert chosen is not None and chosen.name == "b1"
    pool.acquire("b1")
    pool.acquire("b1")
    chosen = pool.choose(client="c")
    assert chosen is not None and chosen.name == "b0"


def test_least_connections_spreads_ties_evenly() -> None:
    pool = Pool(backends(1, 1, 1), balance="least_connections")
    assert spread(pool, 9) == {"b0": 3, "b1": 3, "b2": 3}


def test_release_never_goes_below_zero() -> None:
    pool = Pool(backends(1))
    pool.release("b0")
    pool.release("gone")
    assert pool.sessions("b0") == 0


@pytest.mark.parametrize("balance", ["source_hash", "user_hash"])
def test_hash_policies_keep_a_key_on_its_backend(balance: str) -> None:
    pool = Pool(backends(1, 1, 1), balance=balance)
    keys = [f"10.0.0.{i}" for i in range(60)]
    first = {}
    for key in keys:
        chosen = pool.choose(client=key, user=key)
        assert chosen is not None
        first[key] = chosen.name
    assert set(first.values()) == {"b0", "b1", "b2"}  # the keys spread over all
    for key in keys:
        again = pool.choose(client=key, user=key)
        assert again is not None and again.name == first[key]


def test_source_hash_ignores_the_user_and_user_hash_the_client() -> None:
    source = Pool(backends(1, 1, 1, 1), balance="source_hash")
    by_user = Pool(backends(1, 1, 1, 1), balance="user_hash")
    seen_source = {source.choose(client="10.0.0.1", user=f"u{i}") for i in range(20)}
    seen_user = {by_user.choose(client=f"10.0.0.{i}", user="alice") for i in range(20)}
    assert len(seen_source) == 1
    assert len(seen_user) == 1


def test_a_backend_going_down_moves_only_its_own_keys_and_they_return() -> None:
    pool = Pool(backends(1, 1, 1), balance="source_hash", rise=2)
    keys = [f"10.0.{i}.1" for i in range(90)]

    def mapping() -> dict[str, str]:
        result = {}
        for key in keys:
            chosen = pool.choose(client=key)
            assert chosen is not None
            result[key] = chosen.name
        return result

    before = mapping()
    assert pool.failed("b1", "connection refused") is not None
    during = mapping()
    for key in keys:
        if before[key] != "b1":
            assert during[key] == before[key]
        else:
            assert during[key] != "b1"
    pool.checked("b1", ok=True)
    assert pool.checked("b1", ok=True) is not None
    assert mapping() == before


def test_weights_bias_the_hash_policies() -> None:
    pool = Pool(backends(4, 1), balance="source_hash")
    counts = Counter()
    for i in range(1000):
        chosen = pool.choose(client=f"10.{i // 250}.{i % 250}.1")
        assert chosen is not None
        counts[chosen.name] += 1
    # Expected 800 / 200; the hash is fixed, so this cannot flap.
    assert 700 < counts["b0"] < 900


def test_checks_take_a_backend_out_after_fall_and_back_after_rise() -> None:
    pool = Pool(backends(1, 1), fall=3, rise=2)
    assert pool.checked("b0", ok=False, reason="timeout") is None
    assert pool.checked("b0", ok=False, reason="timeout") is None
    assert pool.is_up("b0")
    change = pool.checked("b0", ok=False, reason="timeout")
    assert change is not None and not change.up and "3 checks failed: timeout" in change.reason
    assert not pool.is_up("b0")
    assert spread(pool, 4) == {"b1": 4}
    assert pool.checked("b0", ok=True) is None
    assert pool.checked("b0", ok=False) is None  # a failure resets the run of successes
    assert pool.checked("b0", ok=True) is None
    change = pool.checked("b0", ok=True)
    assert change is not None and change.up
    assert spread(pool, 4) == {"b0": 2, "b1": 2}


def test_a_success_between_failures_resets_the_count() -> None:
    pool = Pool(backends(1), fall=2)
    pool.checked("b0", ok=False)
    pool.checked("b0", ok=True)
    assert pool.checked("b0", ok=False) is None
    assert pool.is_up("b0")


def test_a_failed_session_attempt_takes_the_backend_out_at_once() -> None:
    pool = Pool(backends(1, 1), fall=3)
    change = pool.failed("b0", "connection refused")
    assert change is not None and not change.up and change.reason == "connection refused"
    assert pool.failed("b0", "again") is None  # already out: no second change
    assert spread(pool, 3) == {"b1": 3}


def test_failover_tries_each_candidate_once_then_gives_up() -> None:
    pool = Pool(backends(1, 1, 1))
    tried: set[str] = set()
    while (chosen := pool.choose(client="c", exclude=frozenset(tried))) is not None:
        tried.add(chosen.name)
        pool.failed(chosen.name, "refused")
    assert tried == {"b0", "b1", "b2"}


def test_when_all_are_down_they_are_still_tried() -> None:
    pool = Pool(backends(1, 1))
    pool.failed("b0", "refused")
    pool.failed("b1", "refused")
    first = pool.choose(client="c")
    assert first is not None
    second = pool.choose(client="c", exclude=frozenset({first.name}))
    assert second is not None and second.name != first.name


def test_choice_stays_within_the_named_backends() -> None:
    pool = Pool(backends(1, 1, 1))
    names = frozenset({"b1", "b2"})
    assert set(spread(pool, 6, names=names)) == {"b1", "b2"}
    assert pool.choose(client="c", names=frozenset({"nope"})) is None


def test_reload_keeps_state_of_unchanged_backends_only() -> None:
    pool = Pool(backends(1, 1))
    pool.failed("b0", "refused")
    pool.failed("b1", "refused")
    pool.acquire("b0")
    moved = Backend("b1", "127.0.0.9", 21)
    renewed = pool.renewed([backends(1)[0], moved], "round_robin", 3, 2)
    assert not renewed.is_up("b0") and renewed.sessions("b0") == 1
    assert renewed.is_up("b1")  # a new address is a new server
    renewed.release("b0")
    assert renewed.sessions("b0") == 0


def test_pool_refuses_duplicate_names_and_unknown_policies() -> None:
    with pytest.raises(ValueError):
        Pool((Backend("a", "h", 21), Backend("a", "g", 21)))
    with pytest.raises(ValueError):
        Pool(backends(1), balance="random")


def test_reports_about_unknown_backends_are_ignored() -> None:
    pool = Pool(backends(1))
    assert pool.checked("gone", ok=False) is None
    assert pool.failed("gone", "x") is None


@given(
    st.lists(st.integers(min_value=1, max_value=10), min_size=1, max_size=6),
    st.integers(min_value=1, max_value=5),
)
def test_round_robin_is_exact_over_whole_cycles(weights: list[int], cycles: int) -> None:
    pool = Pool(backends(*weights))
    counts = spread(pool, sum(weights) * cycles)
    assert counts == {f"b{i}": w * cycles for i, w in enumerate(weights)}


def test_a_served_session_brings_a_down_backend_back_at_once() -> None:
    pool = Pool(backends(1))
    pool.failed("b0", "refused")
    chosen = pool.choose(client="c")  # every candidate is down: tried anyway
    assert chosen is not None and chosen.name == "b0"
    change = pool.served("b0")
    assert change is not None and change.up and change.reason == "a session was served"
    assert pool.is_up("b0")
    assert pool.served("b0") is None


def test_a_change_after_one_check_says_check() -> None:
    pool = Pool(backends(1, 1), fall=1, rise=1)
    change = pool.checked("b0", ok=False, reason="timeout")
    assert change is not None and change.reason == "1 check failed: timeout"
    change = pool.checked("b0", ok=True)
    assert change is not None and change.reason == "1 check passed"
