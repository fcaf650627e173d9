"""Bandwidth limits, the arithmetic: token buckets, draws and their settings, on a fake clock."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config import Config, ConfigError, build, load_file
from gateway.rates import (
    MAX_GRANT,
    Draw,
    Rate,
    RateLimits,
    TokenBucket,
    burst_for,
    parse_rate,
)

MIB = 1024 * 1024


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# ------------------------------------------------------------------------------ settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (1048576, 1048576),
        ("1048576", 1048576),
        ("512k", 512 * 1024),
        ("512K", 512 * 1024),
        ("1M", MIB),
        (" 1m ", MIB),
        ("1.5M", 3 * MIB // 2),
        ("2G", 2 * 1024 * MIB),
        (0, None),
        ("0", None),
        ("0k", None),
    ],
)
def test_rates_parse_numbers_and_binary_units(value: object, expected: int | None) -> None:
    assert parse_rate(value) == expected


@pytest.mark.parametrize(
    "value",
    ["", "1 M", "1MB", "1e6", "-1", "1.5", "M", "0x400", "١٠٢٤", "1,024", True, 1.5e6, [1], 100],
)
def test_rates_refuse_anything_else(value: object) -> None:
    with pytest.raises(ValueError):
        parse_rate(value)


def test_rate_settings_take_one_number_or_a_table_per_direction() -> None:
    config = build(
        {
            "limits.rate_per_session": "1M",
            "limits.rate_per_user": {"download": "512k"},
            "limits.rate_total": {"download": "8M", "upload": 2 * MIB},
        }
    )
    assert config.limits.rate_per_session == Rate(download=MIB, upload=MIB)
    assert config.limits.rate_per_user == Rate(download=512 * 1024, upload=None)
    assert config.limits.rate_total == Rate(download=8 * MIB, upload=2 * MIB)
    assert Config().limits.rate_per_session == Rate() and not Rate().limited


def test_rate_tables_read_from_toml(tmp_path: Path) -> None:
    path = tmp_path / "gw.toml"
    path.write_text(
        '[limits]\nrate_per_user = { upload = "256k", download = 0 }\nrate_total = "4M"\n'
    )
    config = build(load_file(path))
    assert config.limits.rate_per_user == Rate(download=None, upload=256 * 1024)
    assert config.limits.rate_total == Rate(download=4 * MIB, upload=4 * MIB)


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("fast", "limits.rate_total: expected bytes per second like 1048576 or '1M'"),
        (512, "limits.rate_total: 512 is below the smallest rate, 1024 bytes per second"),
        ({"down": "1M"}, "limits.rate_total: unknown key 'down'; a table takes download and"),
        ({"upload": "1 M"}, "limits.rate_total: expected bytes per second"),
    ],
)
def test_bad_rate_settings_name_the_setting(value: object, message: str) -> None:
    with pytest.raises(ConfigError) as refused:
        build({"limits.rate_total": value})
    assert str(refused.value).startswith(message)


# ------------------------------------------------------------------------------- buckets


def test_bucket_starts_full_refills_at_its_rate_and_stops_at_its_burst() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MIB, clock)
    assert bucket.burst == MIB / 8 and bucket.tokens == MIB / 8
    bucket.take(MIB / 8)
    assert bucket.tokens == 0
    clock.advance(0.05)
    assert bucket.tokens == pytest.approx(MIB * 0.05)
    clock.advance(10)
    assert bucket.tokens == MIB / 8


def test_bucket_debt_is_repaid_before_bytes_move_again() -> None:
    clock = FakeClock()
    bucket = TokenBucket(1000 * 1024, clock, burst=64 * 1024)
    bucket.take(64 * 1024 + 100 * 1024)  # a TLS record more than it held
    assert bucket.tokens == -100 * 1024
    assert bucket.wait(10 * 1024) == pytest.approx(0.11)
    clock.advance(0.1)
    assert bucket.tokens == pytest.approx(0, abs=1e-3)


def test_bucket_ignores_a_clock_that_steps_back_and_caps_what_it_gives_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(2048, clock, burst=2048)
    bucket.take(2048)
    clock.now -= 100
    assert bucket.tokens == 0
    bucket.give_back(10_000)
    assert bucket.tokens == 2048


def test_small_rates_keep_a_burst_of_one_second_or_16_kib() -> None:
    assert burst_for(4096) == 4096
    assert burst_for(64 * 1024) == 16 * 1024
    assert burst_for(8 * MIB) == MIB


# --------------------------------------------------------------------------------- draws


def test_a_draw_grants_what_its_emptiest_bucket_holds_at_most_one_read() -> None:
    clock = FakeClock()
    big = TokenBucket(100 * MIB, clock)
    small = TokenBucket(MIB, clock)
    draw = Draw([big, small])
    assert draw.grant() == MAX_GRANT  # both hold more than one read's worth
    assert small.tokens == MIB / 8 - MAX_GRANT and big.tokens == big.burst - MAX_GRANT
    assert draw.moved(MAX_GRANT) == 0
    assert draw.grant() == MAX_GRANT
    draw.moved(MAX_GRANT)
    assert small.tokens == 0
    assert draw.grant() == 0  # nothing: stop reading
    assert draw.wait() == pytest.approx(draw.quantum / MIB)
    clock.advance(draw.wait())
    assert draw.grant() == draw.quantum


def test_a_draw_refuses_grants_smaller_than_its_quantum() -> None:
    clock = FakeClock()
    bucket = TokenBucket(64 * 1024, clock)  # burst 16 KiB, quantum 8 KiB
    draw = Draw([bucket])
    assert draw.quantum == 8 * 1024
    assert draw.grant() == 16 * 1024
    draw.moved(16 * 1024)
    clock.advance(0.1)  # 6.4 KiB refilled: not worth a wake-up
    assert draw.grant() == 0
    assert draw.wait() == pytest.approx(0.025)


def test_bytes_beyond_a_grant_are_charged_and_delay_the_next_grant() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MIB, clock)
    draw = Draw([bucket])
    granted = draw.grant()
    assert draw.moved(granted + 16 * 1024) == 0  # a whole TLS record came with the last read
    assert bucket.tokens == MIB / 8 - granted - 16 * 1024
    assert draw.outstanding == 0


def test_closing_a_draw_gives_unread_grants_back() -> None:
    clock = FakeClock()
    bucket = TokenBucket(MIB, clock)
    draw = Draw([bucket])
    draw.grant()
    draw.moved(1000)
    draw.close()
    assert bucket.tokens == MIB / 8 - 1000
    assert draw.grant() == 0 and draw.moved(5) == 0  # a closed draw moves nothing


@settings(max_examples=200, deadline=None)
@given(
    rate=st.integers(1024, 16 * MIB),
    steps=st.lists(
        st.tuples(st.floats(0, 0.5), st.integers(0, 2 * MAX_GRANT), st.booleans()), max_size=60
    ),
)
def test_what_moves_never_exceeds_rate_times_time_plus_burst(
    rate: int, steps: list[tuple[float, int, bool]]
) -> None:
    """Readers that take grants, read up to (or past) them and sleep: whatever they do, the
    bytes moved by time t stay within rate * t + burst (plus what moved past a grant, which
    the bucket charges as debt)."""
    clock = FakeClock()
    bucket = TokenBucket(rate, clock)
    draws = [Draw([bucket]), Draw([bucket])]
    start = clock.now
    moved = 0
    for index, (sleep, read, overshoot) in enumerate(steps):
        draw = draws[index % 2]
        clock.advance(sleep)
        if draw.outstanding == 0 and draw.grant() == 0:
            assert draw.wait() > 0
            continue
        count = min(read, draw.outstanding) + (1024 if overshoot else 0)
        draw.moved(count)
        moved += count
        assert moved <= rate * (clock.now - start) + bucket.burst + 2 * MAX_GRANT
        assert bucket.tokens >= -1024 * (index + 1)  # debt only from overshoot


def test_waiting_as_told_moves_bytes_at_the_rate() -> None:
    """A reader that sleeps exactly `wait()` when refused moves, over 10 s, the rate's worth
    of bytes plus one burst, and needs no more wake-ups than bytes / quantum."""
    clock = FakeClock()
    rate = MIB
    draw = Draw([TokenBucket(rate, clock)])
    moved = wakeups = 0
    end = clock.now + 10
    while clock.now < end:
        granted = draw.grant()
        if granted:
            moved += granted
            draw.moved(granted)
        else:
            clock.advance(draw.wait())
            wakeups += 1
    assert rate * 10 <= moved <= rate * 10 + burst_for(rate) + MAX_GRANT
    assert wakeups <= moved / draw.quantum


# -------------------------------------------------------------------------- sharing


def limits(clock: FakeClock, **rates: Rate) -> RateLimits:
    unlimited = Rate()
    return RateLimits(
        per_session=rates.get("per_session", unlimited),
        per_user=rates.get("per_user", unlimited),
        total=rates.get("total", unlimited),
        clock=clock,
    )


def test_sessions_of_one_user_share_a_bucket_that_ends_with_their_transfers() -> None:
    clock = FakeClock()
    gateway = limits(clock, per_user=Rate(download=MIB))
    a, b = gateway.session(), gateway.session()
    first, second = a.draw("download", "alice"), b.draw("download", "alice")
    assert first is not None and second is not None
    assert first.grant() == MAX_GRANT and second.grant() == MAX_GRANT
    first.moved(MAX_GRANT)
    second.moved(MAX_GRANT)
    assert first.grant() == 0 and second.grant() == 0  # one bucket of 128 KiB, now empty
    other = a.draw("download", "bob")
    assert other is not None and other.grant() == MAX_GRANT  # another user: its own bucket
    assert gateway.users() == 2
    first.close()
    other.close()
    assert gateway.users() == 1
    second.close()
    assert gateway.users() == 0
    assert a.draw("upload", "alice") is None  # uploads are not limited here


def test_the_total_bucket_is_shared_by_everyone_and_sessions_have_their_own() -> None:
    clock = FakeClock()
    gateway = limits(clock, per_session=Rate(upload=MIB), total=Rate(upload=2 * MIB))
    a, b = gateway.session(), gateway.session()
    first = a.draw("upload", "alice")
    assert first is not None
    while first.grant():
        first.moved(first.outstanding)  # session bucket of 128 KiB empty
    second = a.draw("upload", "alice")
    assert second is not None and second.grant() == 0  # the same session, the same bucket
    third = b.draw("upload", None)  # no login name: no user bucket, still the total
    assert third is not None and third.grant() == MAX_GRANT
    third.moved(MAX_GRANT)
    # total: 256 KiB burst, 128 + 64 KiB taken
    assert third.grant() == MAX_GRANT
    third.moved(MAX_GRANT)
    assert third.grant() == 0
    assert gateway.session().draw("download", "alice") is None


def test_unchanged_limits_are_recognised_on_reload() -> None:
    gateway = limits(FakeClock(), total=Rate(download=MIB, upload=MIB))
    assert gateway.limited
    assert gateway.same_settings(Rate(), Rate(), Rate(download=MIB, upload=MIB))
    assert not gateway.same_settings(Rate(), Rate(), Rate(download=MIB))


def test_a_reload_keeps_unchanged_buckets_and_gives_new_sessions_changed_ones() -> None:
    from twisted.internet.testing import MemoryReactorClock

    from gateway.control import GatewayFactory

    config = build({"limits.rate_total": "1M"})
    factory = GatewayFactory(config, MemoryReactorClock())
    before = factory.rates
    factory.reconfigure(build({"limits.rate_total": "1M", "limits.max_sessions": 5}))
    assert factory.rates is before  # the gateway's total bucket goes on
    factory.reconfigure(build({"limits.rate_total": "2M"}))
    assert factory.rates is not before and factory.rates.total == Rate(2 * MIB, 2 * MIB)


# ------------------------------------------------------------- on the reactor (copy relay)


def test_throttled_source_reads_only_what_is_granted_and_both_pauses_must_lift() -> None:
    """The source transport reads while the sink wants bytes *and* the buckets allow, at most
    the grant per read (its bufferSize), and wakes once from a timer when they are empty."""
    from twisted.internet.task import Clock
    from twisted.internet.testing import StringTransport

    from gateway.throttle import ThrottledSource

    clock = Clock()
    bucket = TokenBucket(64 * 1024, clock.seconds)  # burst 16 KiB, quantum 8 KiB
    draw = Draw([bucket])
    transport = StringTransport()
    source = ThrottledSource(transport, draw, clock)
    source.resumeProducing()
    assert transport.producerState == "producing" and transport.bufferSize == 16 * 1024
    source.received(10 * 1024)
    assert transport.producerState == "producing" and transport.bufferSize == 6 * 1024
    source.received(6 * 1024)
    assert transport.producerState == "paused"
    (wake,) = clock.getDelayedCalls()
    assert wake.getTime() == pytest.approx(0.125)  # 8 KiB at 64 KiB/s
    source.pauseProducing()  # the sink is full too
    clock.advance(0.125)
    assert transport.producerState == "paused"  # the buckets alone do not resume it
    source.resumeProducing()
    assert transport.producerState == "producing" and transport.bufferSize == 8 * 1024
    source.received(8 * 1024)
    assert len(clock.getDelayedCalls()) == 1
    source.stop()
    assert clock.getDelayedCalls() == [] and draw.closed
    source.resumeProducing()
    assert transport.producerState == "paused"  # a stopped throttle never reads again
