"""Bandwidth limits: token buckets and the draws transfers make on them; pure, no I/O.

Three settings limit transfer rates in bytes per second, each for downloads and uploads
separately (`Rate`): `limits.rate_per_session`, `limits.rate_per_user` (shared by every session
of one login name) and `limits.rate_total` (the whole gateway). Each limit is a `TokenBucket`
that fills at its rate up to a burst; a transfer draws from its session's, its user's and the
gateway's bucket at once (`Draw`), so the tightest of them sets its pace.

The relay asks for a grant before it reads: a number of bytes it may read and forward now,
taken from every bucket, at most `MAX_GRANT`. With nothing granted it stops reading and asks
again after `Draw.wait()` seconds, when every bucket will have refilled enough for a useful
grant (`Draw.quantum`): no busy-waiting, and no byte is read that it may not forward. A TLS
layer can hand over a little more than was granted (a record that was partly read before);
`Draw.moved` charges the excess to the buckets, so the next grant waits for it.

Time comes from an injected clock (`reactor.seconds` in the gateway, a fake in tests).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

Direction = Literal["download", "upload"]
DIRECTIONS: tuple[Direction, ...] = ("download", "upload")

#: Most bytes one grant allows: what the relay reads or splices per wake-up at most.
MAX_GRANT = 64 * 1024
#: A bucket holds at most this many seconds of its rate (its burst), but never less than
#: `MIN_BURST` bytes or its rate, whichever is smaller: a slow limit still moves whole reads.
BURST_SECONDS = 0.125
MIN_BURST = 16 * 1024
#: The smallest rate a setting accepts, bytes per second.
MIN_RATE = 1024

_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
#: A rate as a setting writes it: digits, an optional fraction, an optional binary unit.
_RATE = re.compile(r"([0-9]+(?:\.[0-9]+)?)([kmg]?)", re.ASCII | re.IGNORECASE)


@dataclass(frozen=True, slots=True)
class Rate:
    """One limit's bytes per second for each direction; None is unlimited."""

    download: int | None = None
    upload: int | None = None

    def of(self, direction: Direction) -> int | None:
        return self.download if direction == "download" else self.upload

    @property
    def limited(self) -> bool:
        return self.download is not None or self.upload is not None


#: No limit in either direction: every rate setting's default.
UNLIMITED = Rate()


def parse_rate(value: object) -> int | None:
    """Bytes per second from a setting's value: a whole number, or a string of digits with an
    optional binary unit k, M or G ("512k" is 524288, "1.5M" 1572864). 0 is unlimited (None).
    Raises ValueError with a sentence for anything else, including rates below `MIN_RATE`."""
    if isinstance(value, bool):
        raise ValueError(f"expected bytes per second like 1048576 or '1M', got {value!r}")
    if isinstance(value, int):
        number = value
    elif isinstance(value, str) and (match := _RATE.fullmatch(value.strip())):
        digits, unit = match.groups()
        number = math.floor(float(digits) * _UNITS[unit.lower()])
    else:
        raise ValueError(f"expected bytes per second like 1048576 or '1M', got {value!r}")
    if number == 0:
        return None
    if number < MIN_RATE:
        raise ValueError(f"{value!r} is below the smallest rate, {MIN_RATE} bytes per second")
    return number


def burst_for(rate: float) -> float:
    """How many bytes a bucket of `rate` may hold (see `BURST_SECONDS`)."""
    return max(rate * BURST_SECONDS, min(rate, MIN_BURST))


class TokenBucket:
    """Bytes that may move now: fills at `rate` per second up to `burst`, starts full.

    Taking more than it holds leaves it in debt (negative), which later refills repay first.
    """

    __slots__ = ("_clock", "_tokens", "_updated", "burst", "rate")

    def __init__(self, rate: float, clock: Callable[[], float], burst: float | None = None) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = float(rate)
        self.burst = float(burst if burst is not None else burst_for(rate))
        self._clock = clock
        self._tokens = self.burst
        self._updated = clock()

    @property
    def tokens(self) -> float:
        """Bytes that may move now; negative while the bucket is in debt."""
        now = self._clock()
        elapsed = max(0.0, now - self._updated)  # a clock that steps back adds nothing
        self._tokens = min(self.burst, self._tokens + elapsed * self.rate)
        self._updated = now
        return self._tokens

    def take(self, count: float) -> None:
        """`count` bytes moved (or were promised): take them, into debt if need be."""
        self._tokens = self.tokens - count

    def give_back(self, count: float) -> None:
        """Return promised bytes that did not move; the bucket never exceeds its burst."""
        self._tokens = min(self.burst, self.tokens + count)

    def wait(self, count: float) -> float:
        """Seconds until the bucket holds `count` bytes (0 if it does now); `count` must not
        exceed the burst, or the wait would never end."""
        return max(0.0, (min(count, self.burst) - self.tokens) / self.rate)


class Draw:
    """One transfer's claim on the buckets that limit it (session, user, gateway).

    `grant()` takes bytes from every bucket at once, as many as the emptiest one holds and at
    most `most`; `moved(n)` reports bytes read against the grant; `close()` returns what was
    granted but not read and tells the owner of shared buckets this transfer is done.
    """

    __slots__ = ("_buckets", "_on_close", "closed", "most", "outstanding", "quantum")

    def __init__(
        self,
        buckets: Sequence[TokenBucket],
        *,
        most: int = MAX_GRANT,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        if not buckets:
            raise ValueError("a draw needs at least one bucket")
        self._buckets = tuple(buckets)
        self._on_close = on_close
        self.most = most
        #: The smallest grant worth a wake-up: half the smallest burst, at most `most`.
        self.quantum = max(1, min(most, int(min(b.burst for b in buckets) // 2)))
        #: Bytes granted and not yet read.
        self.outstanding = 0
        self.closed = False

    def grant(self) -> int:
        """Bytes the transfer may read now (added to `outstanding`), or 0: then stop reading
        and ask again after `wait()`. A grant is at least `quantum` bytes."""
        if self.closed:
            return 0
        room = self.most - self.outstanding
        available = min(bucket.tokens for bucket in self._buckets)
        granted = int(min(room, available))
        if granted < min(self.quantum, room) or granted <= 0:
            return 0
        for bucket in self._buckets:
            bucket.take(granted)
        self.outstanding += granted
        return granted

    def moved(self, count: int) -> int:
        """`count` bytes were read; returns what is left of the grant. Bytes beyond the grant
        (a TLS record that was partly read before) are charged to every bucket now."""
        if self.closed:
            return 0
        self.outstanding -= count
        if self.outstanding < 0:
            for bucket in self._buckets:
                bucket.take(-self.outstanding)
            self.outstanding = 0
        return self.outstanding

    def wait(self) -> float:
        """Seconds until every bucket holds a `quantum` (0 if they do now). Another transfer
        sharing a bucket may take it first; `grant()` then returns 0 and the wait starts over."""
        return max(bucket.wait(self.quantum) for bucket in self._buckets)

    def close(self) -> None:
        """The transfer ended: give back what it was granted and did not read."""
        if self.closed:
            return
        self.closed = True
        if self.outstanding:
            for bucket in self._buckets:
                bucket.give_back(self.outstanding)
            self.outstanding = 0
        if self._on_close is not None:
            self._on_close()


class RateLimits:
    """The buckets of one gateway configuration: the gateway's own, one per login name while
    that name has transfers running (shared by its sessions), and each session's (`session`).

    A user's bucket lives as long as it has transfers; the next transfer of that name starts
    with a full one. Sessions keep theirs for their whole life.
    """

    def __init__(
        self,
        *,
        per_session: Rate,
        per_user: Rate,
        total: Rate,
        clock: Callable[[], float],
    ) -> None:
        self.per_session = per_session
        self.per_user = per_user
        self.total = total
        self._clock = clock
        self._total = {d: self._bucket(total.of(d)) for d in DIRECTIONS}
        self._users: dict[tuple[str, Direction], tuple[TokenBucket, int]] = {}

    @property
    def limited(self) -> bool:
        return self.per_session.limited or self.per_user.limited or self.total.limited

    def same_settings(self, per_session: Rate, per_user: Rate, total: Rate) -> bool:
        return (self.per_session, self.per_user, self.total) == (per_session, per_user, total)

    def _bucket(self, rate: int | None) -> TokenBucket | None:
        return None if rate is None else TokenBucket(rate, self._clock)

    def session(self) -> SessionRates:
        """The buckets of one new session."""
        return SessionRates(self, {d: self._bucket(self.per_session.of(d)) for d in DIRECTIONS})

    def users(self) -> int:
        """How many login names have a bucket now (transfers running)."""
        return len(self._users)

    def _user_bucket(self, user: str, direction: Direction) -> TokenBucket | None:
        rate = self.per_user.of(direction)
        if rate is None:
            return None
        key = (user, direction)
        bucket, count = self._users.get(key) or (TokenBucket(rate, self._clock), 0)
        self._users[key] = (bucket, count + 1)
        return bucket

    def _release_user(self, user: str, direction: Direction) -> None:
        key = (user, direction)
        bucket, count = self._users[key]
        if count > 1:
            self._users[key] = (bucket, count - 1)
        else:
            del self._users[key]


class SessionRates:
    """One session's buckets, and the draws its transfers make."""

    __slots__ = ("_buckets", "_limits")

    def __init__(self, limits: RateLimits, buckets: dict[Direction, TokenBucket | None]) -> None:
        self._limits = limits
        self._buckets = buckets

    def draw(self, direction: Direction, user: str | None) -> Draw | None:
        """The draw of a transfer in `direction` by login name `user` (None before any login,
        which no user limit applies to); None when nothing limits it."""
        limits = self._limits
        buckets = [self._buckets[direction], limits._total[direction]]
        release: Callable[[], None] | None = None
        if user is not None:
            user_bucket = limits._user_bucket(user, direction)
            if user_bucket is not None:
                buckets.append(user_bucket)

                def release() -> None:
                    limits._release_user(user, direction)

        chosen = [bucket for bucket in buckets if bucket is not None]
        return Draw(chosen, on_close=release) if chosen else None
