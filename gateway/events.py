"""The names of what happened, as logged in every line's `event` field.

A log line that metrics count or operators search for carries `event=Event.X`. Naming each
event once, here, means a misspelt name is an AttributeError at import, not a metric that
silently stays at zero: `gateway.metrics` keys its counters on these members, and
tests/test_events.py checks that every member is logged somewhere and every counted one exists.
The values are the strings that appear in the logs (and in JSON logs), so they never change.
"""

from __future__ import annotations

from enum import StrEnum


class Event(StrEnum):
    # Sessions (control.py; the session for a refused transparent connection).
    SESSION_STARTED = "session_started"
    """A client connected and its session started."""
    SESSION_ENDED = "session_ended"
    """A session's client connection closed."""
    SESSION_REFUSED = "session_refused"
    """A client was turned away before a session started; `reason_key` says why."""

    # Upstream control connections.
    UPSTREAM_CONNECTED = "upstream_connected"
    """An upstream control connection is up; `seconds` is how long it took."""
    UPSTREAM_OPENED = "upstream_opened"
    """A session's upstream control connection is open (the line names the backend, if any)."""
    UPSTREAM_CONNECT_FAILED = "upstream_connect_failed"
    """An upstream control connection could not be made."""
    PROXY_LOGGED_IN = "proxy_logged_in"
    """Forward mode or routes: the gateway accepted a proxy user's credentials."""
    ROUTED = "routed"
    """Routes: a user was sent to the backends of a route, as an upstream user."""
    SESSION_TIMEOUT = "session_timeout"
    """A session's login or idle timer ran out (421)."""
    UPSTREAM_TLS_REFUSED = "upstream_tls_refused"
    """The upstream listed AUTH TLS in FEAT but refused it; the session went on in clear text
    (`tls.upstream = "auto"` only)."""
    UPSTREAM_TLS_FAILED = "upstream_tls_failed"
    """TLS to the upstream failed (handshake or certificate): the session ends with 421."""
    UPSTREAM_PROTOCOL_ERROR = "upstream_protocol_error"
    """The upstream sent something that is not FTP, or a reply the gateway must read was
    malformed."""
    LOGGED_IN = "logged_in"
    """The upstream accepted the session's login."""
    UPSTREAM_LOGIN_FAILED = "upstream_login_failed"
    """The upstream refused a login (530 to USER, PASS or ACCT)."""
    REPLY_TIMEOUT = "reply_timeout"
    """The upstream left a command unanswered for `timeouts.reply` seconds."""
    UPSTREAM_NOT_ANSWERING = "upstream_not_answering"
    """ABOR while the upstream owes too many replies: the session ends with 421."""
    UPSTREAM_LOOP_REFUSED = "upstream_loop_refused"
    """The upstream named is this gateway itself: the connection is not made."""
    UNSOLICITED_REPLY = "unsolicited_reply"
    """The upstream sent a reply to no command (dropped)."""
    UNSOLICITED_REPLIES = "unsolicited_replies"
    """At the session's end: how many unsolicited replies the upstream sent in all."""
    CONTROL_NOT_READ = "control_not_read"
    """A peer left its control connection unread too long; the session ends."""

    # Reverse mode's backends (`gateway.balancer`).
    BACKEND_CONFIGURED = "backend_configured"
    """A backend is in the pool (at start or on reload), with its state and sessions."""
    BACKEND_REMOVED = "backend_removed"
    """A reload took a backend out of the pool."""
    BACKEND_UP = "backend_up"
    """A backend's health checks pass again."""
    BACKEND_DOWN = "backend_down"
    """A backend failed its health checks; no new session goes to it."""
    BACKEND_SESSION_STARTED = "backend_session_started"
    """A session was sent to a backend."""
    BACKEND_SESSION_ENDED = "backend_session_ended"
    """A session sent to a backend ended."""
    BACKEND_FAILED = "backend_failed"
    """A backend failed a session as it connected or greeted; the next one was tried."""

    # Policy.
    PROXY_LOGIN_FAILED = "proxy_login_failed"
    """Forward mode: proxy credentials were refused."""
    REFUSED = "refused"
    """A request was refused by policy; `refused` names the kind (upstream, command, ...)."""
    USER_STORE_UNAVAILABLE = "user_store_unavailable"
    """Forward mode: a proxy login could not be checked (the user store did not answer)."""
    HTPASSWD_UNUSABLE = "htpasswd_unusable"
    """An htpasswd file cannot be used; proxy logins through it fail until it is fixed."""
    LDAP_NOT_IN_GROUP = "ldap_not_in_group"
    """An LDAP proxy user is not a member of the required group."""
    LDAP_SPELLING = "ldap_spelling"
    """An LDAP proxy login named the user otherwise than the directory spells it."""

    # Transfers.
    TRANSFER_FINISHED = "transfer_finished"
    """A transfer command got its final reply; `code` and `verb` say which."""
    TRANSFER_ABORTED = "transfer_aborted"
    """A transfer was aborted (ABOR)."""
    RELAY_STARTED = "relay_started"
    """Both data connections are up and bytes start to move."""
    RELAY_FINISHED = "relay_finished"
    """The byte relay ended; `bytes`, `seconds`, `direction` and `outcome` describe it."""
    PASSIVE_LISTEN_FAILED = "passive_listen_failed"
    """A passive listener could not be opened (no free port in the range, ...)."""
    DATA_CONNECTION_FAILED = "data_connection_failed"
    """A data connection could not be opened or accepted (the transfer gets 425)."""
    SPLICE_UNAVAILABLE = "splice_unavailable"
    """No pipe for a spliced transfer: it is copied instead."""
    DATA_CONNECTION_DROPPED = "data_connection_dropped"
    """A data connection from the wrong address was dropped (possible data-port theft)."""
    RELAY_IGNORED_BYTES = "relay_ignored_bytes"
    """The receiving side of a transfer sent bytes; they were dropped."""

    # The process.
    LISTENING = "listening"
    """A listener is bound (one start-up line per listener)."""
    CONFIG_RELOADED = "config_reloaded"
    """SIGHUP: the configuration was reloaded, or not; `result` says which."""
    STARTUP_FAILED = "startup_failed"
    """The gateway could not start; the line names the reason."""
    OPEN_FILES_LIMIT = "open_files_limit"
    """At start: the open files limit (RLIMIT_NOFILE) the gateway runs with."""
    RELOAD_NEEDS_RESTART = "reload_needs_restart"
    """SIGHUP: a changed setting takes effect only on restart; the running value is kept."""
    TRANSFER_LOG_FAILED = "transfer_log_failed"
    """SIGUSR1: the transfer log could not be reopened."""
    DEMO_STARTED = "demo_started"
    """--demo: the demonstration upstream is serving."""
    LOGS_REOPENED = "logs_reopened"
    """SIGUSR1: the log files were reopened (after rotation)."""
    STOP_REQUESTED = "stop_requested"
    """SIGTERM or SIGINT: the gateway is asked to stop (the shutdown follows)."""
    SHUTDOWN_STARTED = "shutdown_started"
    """SIGTERM: the gateway stopped accepting and waits for running transfers."""
    SHUTDOWN_FORCED = "shutdown_forced"
    """`timeouts.shutdown` passed: the sessions still running were closed."""
    SHUTDOWN_COMPLETE = "shutdown_complete"
    """Every session has ended; the gateway stops."""
