"""A zero-copy relay for plain TCP data connections on Linux: `splice(2)` through a pipe.

The copy relay (`gateway.data.relay`) moves every byte through Python: the kernel copies it
into a bytes object, Twisted queues it, and the kernel copies it out again. Here the bytes go
from one socket into a pipe and from the pipe into the other socket without leaving the
kernel. The reactor still drives everything (no threads): once both Twisted transports are
paused, one small descriptor per socket is registered with `addReader`/`addWriter`, and when
the relay ends the sockets go back to their Twisted transports to be closed (or aborted).

The outcome is the copy relay's, case for case:

- success only when the source ended cleanly (FIN), every byte went into the sink, the sink
  was shut down for writing (SHUT_WR) and its peer then closed its side cleanly;
- a reset or error on either side, the sink closing first, or `stall` seconds without a byte
  moving fails the relay and aborts both connections;
- backpressure: the source is read only while the pipe has room, and the pipe is drained only
  while the sink's socket buffer has room, so a slow reader pauses a fast writer and memory
  per transfer is bounded by the pipe and the two socket buffers;
- bytes the receiving side sends (nothing should come that way) are read into one shared
  scratch buffer and dropped, never stored.

`relay()` chooses: splice for plain TCP on Linux when `data.relay` is "auto" or "splice", the
copy relay for TLS data connections, other systems, "copy", and anything splice cannot take
(bytes already read from the source, bytes queued for the sink, no pipe available).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import sys
from typing import Any

from twisted.internet import error
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorFDSet, IReactorTime, IReadWriteDescriptor
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from gateway.data import DataConnection, RelayResult, _describe
from gateway.data import relay as copy_relay
from gateway.events import Event
from gateway.rates import Draw
from gateway.throttle import Pacer

_log = Logger(namespace="gateway.data")

RELAY_MODES = ("auto", "splice", "copy")

#: Pipe capacity asked for (F_SETPIPE_SZ), capped by /proc/sys/fs/pipe-max-size; the kernel's
#: default of 64 KiB is kept when the request is refused. On loopback a 1 MiB pipe moved about
#: a tenth more per second than a 256 KiB one (fewer wake-ups per byte); it is also the most a
#: transfer holds in the pipe.
PIPE_SIZE = 1024 * 1024


def _proc_int(path: str, default: int) -> int:
    try:
        with open(path) as f:
            return int(f.read())
    except (OSError, ValueError):
        return default


#: Pipe pages count against a per-user budget (pipe-user-pages-soft, 16384 pages by default);
#: past it, the kernel refuses larger pipes and gives new ones two pages. Enlarged pipes use at
#: most half of it, so the transfers beyond keep the default size. Root is not limited.
_PIPE_BUDGET = (
    _proc_int("/proc/sys/fs/pipe-user-pages-soft", 16384) * os.sysconf("SC_PAGE_SIZE") // 2
)
_PIPE_WANTED = min(PIPE_SIZE, _proc_int("/proc/sys/fs/pipe-max-size", PIPE_SIZE))
#: Bytes of enlarged pipes that transfers of this process hold now.
_enlarged = 0

#: Bytes one wake-up reads from a source at most before the reactor serves other transfers.
BURST = 4 * 1024 * 1024

_DEFAULT_PIPE = 64 * 1024
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_F_GETPIPE_SZ = getattr(fcntl, "F_GETPIPE_SZ", 1032)
_FLAGS = getattr(os, "SPLICE_F_MOVE", 1) | getattr(os, "SPLICE_F_NONBLOCK", 2)

#: Bytes from a transfer's receiving side are read into this one buffer and dropped.
_SCRATCH = bytearray(64 * 1024)


def available() -> bool:
    """Whether this system can splice between sockets (Linux, Python 3.10+)."""
    return sys.platform.startswith("linux") and hasattr(os, "splice")


def relay(
    source: DataConnection,
    sink: DataConnection,
    clock: IReactorTime,
    stall: float,
    mode: str = "auto",
    log: Logger = _log,
    draw: Draw | None = None,
) -> Deferred[RelayResult]:
    """Move every byte from `source` to `sink`: spliced when `mode` and the connections
    allow it, otherwise through the copy relay. Same outcome either way. `log` is the
    session's logger, so the relay's own lines carry the session id. With a `draw`
    (bandwidth limits) either relay moves only what the draw's buckets grant."""
    if mode != "copy" and available() and _spliceable(source) and _spliceable(sink):
        started = SpliceRelay.start(source, sink, clock, stall, log, draw)
        if started is not None:
            return started
    return copy_relay(source, sink, clock, stall, log, draw)


def _spliceable(connection: DataConnection) -> bool:
    """Plain TCP with nothing read ahead or queued: the socket holds the whole state."""
    transport: Any = connection.transport
    if connection.tls is not None or connection.lost or connection._early:
        return False
    if getattr(transport, "TLS", False) or transport.dataBuffer or transport._tempDataBuffer:
        return False
    return isinstance(getattr(transport, "socket", None), socket.socket)


def _pipe() -> tuple[int, int, int] | None:
    """A non-blocking pipe and its capacity, or None when the process is out of descriptors.
    The pipe is enlarged to `PIPE_SIZE` while that stays within the budget."""
    global _enlarged
    try:
        read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        _log.warn(
            "No pipe for a spliced transfer ({error}); copying instead",
            error=e.strerror,
            event=Event.SPLICE_UNAVAILABLE,
        )
        return None
    if os.geteuid() == 0 or not _PIPE_BUDGET or _enlarged + _PIPE_WANTED <= _PIPE_BUDGET:
        # Over pipe-user-pages-soft or pipe-max-size the default size works too.
        with contextlib.suppress(OSError):
            fcntl.fcntl(write_end, _F_SETPIPE_SZ, _PIPE_WANTED)
    size = fcntl.fcntl(write_end, _F_GETPIPE_SZ)
    if size > _DEFAULT_PIPE:
        _enlarged += size
    return read_end, write_end, size


def _close_pipe(read_end: int, write_end: int, size: int) -> None:
    global _enlarged
    os.close(read_end)
    os.close(write_end)
    if size > _DEFAULT_PIPE:
        _enlarged -= size


@implementer(IReadWriteDescriptor)
class _End:
    """One socket of a spliced transfer, as the reactor sees it while the relay owns it."""

    __slots__ = ("_fd", "_relay", "_source")

    def __init__(self, relay: SpliceRelay, fd: int, source: bool) -> None:
        self._relay = relay
        self._fd = fd
        self._source = source

    def fileno(self) -> int:
        return self._fd

    def logPrefix(self) -> str:
        return "SpliceRelay"

    def doRead(self) -> None:
        if self._source:
            self._relay.pull()
        else:
            self._relay.drain_sink()

    def doWrite(self) -> None:
        self._relay.push()

    def connectionLost(self, reason: Failure) -> None:
        self._relay.lost(self._source, reason)


class SpliceRelay:
    """One spliced transfer: the source socket into a pipe, the pipe into the sink socket."""

    __slots__ = (
        "_clock",
        "_discarded",
        "_done",
        "_in_pipe",
        "_log",
        "_moved",
        "_pacer",
        "_pipe_size",
        "_reactor",
        "_read_end",
        "_reading",
        "_seen",
        "_shut",
        "_sink",
        "_sink_end",
        "_source",
        "_source_end",
        "_source_ended",
        "_stall",
        "_timer",
        "_write_end",
        "_writing",
        "count",
    )

    def __init__(
        self,
        source: DataConnection,
        sink: DataConnection,
        clock: IReactorTime,
        stall: float,
        pipe: tuple[int, int, int],
        log: Logger = _log,
        draw: Draw | None = None,
    ) -> None:
        self._log = log
        #: Bandwidth limits: how much may be spliced now, and a wake-up when nothing may.
        self._pacer = None if draw is None else Pacer(draw, clock, self._resume_source)
        self._source = source
        self._sink = sink
        self._clock = clock
        self._stall = stall
        self._read_end, self._write_end, self._pipe_size = pipe
        src: Any = source.transport
        self._reactor: IReactorFDSet = src.reactor
        self._source_end = _End(self, src.fileno(), source=True)
        self._sink_end = _End(self, sink.transport.fileno(), source=False)  # type: ignore[union-attr]
        self._done: Deferred[RelayResult] = Deferred()
        self.count = 0  # bytes read from the source, as the copy relay counts them
        self._moved = 0  # bytes moved either way, for the stall watchdog
        self._seen = -1
        self._in_pipe = 0
        self._discarded = 0
        self._reading = False
        self._writing = False
        self._source_ended = False
        self._shut = False
        self._timer = clock.callLater(0, self._watchdog)

    @classmethod
    def start(
        cls,
        source: DataConnection,
        sink: DataConnection,
        clock: IReactorTime,
        stall: float,
        log: Logger = _log,
        draw: Draw | None = None,
    ) -> Deferred[RelayResult] | None:
        pipe = _pipe()
        if pipe is None:
            return None
        self = cls(source, sink, clock, stall, pipe, log, draw)
        # The Twisted transports stay paused (DataConnection pauses them when ready) and write
        # nothing: from here until `_finish` this relay alone watches both sockets.
        for connection in (source, sink):
            connection.on_lost = _ignore
            connection.on_abort = self._aborted
            transport: Any = connection.transport
            transport.stopReading()
            transport.stopWriting()
        # The sink is read too: that is how its close or reset is seen.
        self._reactor.addReader(self._sink_end)
        self._resume_source()
        return self._done

    # ------------------------------------------------------------------ moving bytes

    def pull(self) -> None:
        """The source is readable: move what can be moved now."""
        self._pump(from_source=True)

    def push(self) -> None:
        """The sink's socket buffer has room again: move what can be moved now."""
        self._pump(from_source=False)

    def _pump(self, from_source: bool) -> None:
        """Fill the pipe from the source and drain it into the sink, in turns, until neither
        side moves a byte or `BURST` bytes have come in (other transfers get their turn; the
        reactor calls again while the sockets stay ready). One wake-up thus moves what both
        socket buffers hold, instead of one splice each way per readiness event.

        Afterwards the reactor watches the source only while the pipe has room and the
        buckets allow, and the sink for writing only while bytes wait in the pipe: a slow
        reader stops the reading from a fast writer. With bandwidth limits a wake-up reads at
        most one grant of the pacer."""
        if self._done.called:
            return
        flat = self._exchange(from_source)
        if flat is not None:
            self._watch(flat)

    def _exchange(self, from_source: bool) -> bool | None:
        """Move bytes in turns, fill then drain, while `_another_turn` says so: whether a
        readable source gave nothing for all the room in the pipe (its slots may be full), or
        None when the relay failed."""
        budget = BURST
        flat = True
        while True:
            got = 0
            if not self._source_ended and self._in_pipe < self._pipe_size:
                got = self._fill(min(budget, self._pipe_size - self._in_pipe))
                if got < 0:
                    return None
                budget -= got
            if got or self._source_ended or not from_source:
                flat = False
            sent = self._drain()
            if sent < 0:
                return None
            if not self._another_turn(got, sent, budget):
                return flat

    def _another_turn(self, got: int, sent: int, budget: int) -> bool:
        """Both sides may move more now: the sink took what the pipe held, something moved,
        the wake-up's budget is not spent, the source has not ended, and no pacer limits the
        wake-up to one grant."""
        if self._in_pipe and not sent:
            return False  # the sink takes no more: wait for it to be writable
        moved = bool(got or sent)
        return moved and budget > 0 and not self._source_ended and self._pacer is None

    def _watch(self, flat: bool) -> None:
        """Which sockets the reactor watches after a wake-up (see `_pump`)."""
        self._want_write(self._in_pipe > 0)
        if self._source_ended:
            self._pause_source()  # a source at its end stays readable
            if not self._in_pipe:
                self._close_sink()
        elif self._in_pipe >= self._pipe_size or (flat and self._in_pipe):
            # No room in the pipe (by bytes, or by its slots when a readable source gave
            # nothing): the sink's next write event reads on.
            self._pause_source()
        elif self._pacer is not None and not self._pacer.allowance():
            self._pause_source()  # the pacer resumes it when the buckets have refilled
        else:
            self._resume_source()

    def _fill(self, room: int) -> int:
        """Splice from the source into the pipe, at most `room` bytes, until the source has
        nothing more to give: bytes read, or -1 when the relay failed."""
        pacer = self._pacer
        if pacer is not None:
            # Bandwidth limits: never take more from the source than may be forwarded now.
            allowed = pacer.allowance()
            if not allowed:
                return 0
            room = min(room, allowed)
        source = self._source_end.fileno()
        got = 0
        while room > 0:  # splice(2) of 0 bytes returns 0, which would read as the end
            try:
                n = os.splice(source, self._write_end, room, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self._fail(f"{_text(e)} after {self.count} bytes")
                return -1
            if n == 0:
                self._source_ended = True
                if pacer is not None:
                    pacer.stop()
                break
            got += n
            room -= n
            self.count += n
            self._moved += n
            self._in_pipe += n
            if pacer is not None:
                pacer.moved(n)
            if room:
                # A short read: the socket had no more queued (or the pipe no free slot);
                # asking again now would only return EAGAIN.
                break
        return got

    def _drain(self) -> int:
        """Splice the pipe into the sink as far as its socket buffer takes it: bytes sent,
        or -1 when the relay failed."""
        sink = self._sink_end.fileno()
        sent = 0
        while self._in_pipe:
            try:
                n = os.splice(self._read_end, sink, self._in_pipe, flags=_FLAGS)
            except BlockingIOError:
                break
            except OSError as e:
                self._sink_failed(_text(e))
                return -1
            sent += n
            self._in_pipe -= n
            self._moved += n
            if self._in_pipe:
                break  # a short write: the sink's socket buffer is full
        return sent

    def drain_sink(self) -> None:
        """The sink is readable: its peer closed, reset, or sent bytes it should not have."""
        if self._done.called:
            return
        try:
            n = self._sink_socket().recv_into(_SCRATCH)
        except BlockingIOError:
            return
        except OSError as e:
            self._sink_failed(_text(e))
            return
        if n == 0:
            if self._shut:
                self._finish(True, f"{self.count} bytes")
            else:
                self._sink_failed("connection closed")
            return
        self._discarded += n

    def lost(self, source: bool, reason: Failure) -> None:
        """The reactor saw a hang-up or error on one of the sockets."""
        if self._done.called:
            return
        if source:
            self._fail(f"{_describe(reason)} after {self.count} bytes")
        else:
            self._sink_failed(_describe(reason))

    # ------------------------------------------------------------------ states

    def _sink_failed(self, reason: str) -> None:
        if self._source_ended:
            self._fail(f"{reason} while delivering the last bytes")
        else:
            self._fail(f"receiving side closed the connection after {self.count} bytes")

    def _close_sink(self) -> None:
        """Every byte is in the sink's socket: send FIN and wait for the peer's close."""
        if self._shut:
            return
        self._shut = True
        try:
            self._sink_socket().shutdown(socket.SHUT_WR)
        except OSError as e:
            self._fail(f"{_text(e)} while delivering the last bytes")

    def _pause_source(self) -> None:
        if self._reading:
            self._reading = False
            self._reactor.removeReader(self._source_end)

    def _resume_source(self) -> None:
        if self._reading or self._source_ended or self._done.called:
            return
        if self._pacer is not None and not self._pacer.allowance():
            return  # the buckets are empty; the pacer calls again when they are not
        self._reading = True
        self._reactor.addReader(self._source_end)

    def _want_write(self, on: bool) -> None:
        if on and not self._writing:
            self._reactor.addWriter(self._sink_end)
        elif not on and self._writing:
            self._reactor.removeWriter(self._sink_end)
        self._writing = on

    def _sink_socket(self) -> socket.socket:
        return self._sink.transport.socket  # type: ignore[union-attr, no-any-return]

    def _watchdog(self) -> None:
        if self._done.called:
            return
        if self._moved == self._seen:
            self._fail(f"no data moved for {self._stall:g} seconds after {self.count} bytes")
            return
        self._seen = self._moved
        self._timer = self._clock.callLater(self._stall, self._watchdog)

    def _aborted(self) -> None:
        """The session closed a data connection during the transfer (ABOR, session end)."""
        self._fail(f"transfer aborted after {self.count} bytes")

    def _fail(self, detail: str) -> None:
        self._finish(False, detail)

    def _finish(self, ok: bool, detail: str) -> None:
        """Give both sockets back to their transports, closed cleanly or aborted."""
        if self._done.called:
            return
        if self._timer.active():
            self._timer.cancel()
        if self._pacer is not None:
            self._pacer.stop()
        self._pause_source()
        self._want_write(False)
        self._reactor.removeReader(self._sink_end)
        _close_pipe(self._read_end, self._write_end, self._pipe_size)
        if self._discarded:
            peer = self._sink.transport.getPeer()  # type: ignore[union-attr]
            self._log.warn(
                "Dropped {ignored} bytes sent by the receiving side {peer} of a transfer",
                ignored=self._discarded,
                peer=str(getattr(peer, "host", "")),
                event=Event.RELAY_IGNORED_BYTES,
            )
        for connection in (self._source, self._sink):
            connection.on_abort = None
            if ok:
                # Both peers have closed their side: close the sockets now (shutdown, close),
                # through the transport so the connection is marked lost before the outcome is
                # reported and a later abort() cannot turn the clean close into a reset.
                transport: Any = connection.transport
                transport.connectionLost(Failure(error.ConnectionDone()))
            else:
                connection.abort()
        self._done.callback(RelayResult(ok, self.count, detail, path="splice"))


def _ignore(connection: DataConnection, reason: Failure) -> None:
    """The relay has already decided; the transport's own close report adds nothing."""


def _text(e: OSError) -> str:
    if e.errno in (errno.ECONNRESET, errno.EPIPE):
        return "Connection to the other side was lost in a non-clean fashion: Connection lost."
    return e.strerror or type(e).__name__
