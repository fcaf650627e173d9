"""Exceptions shared by the pure core; each protocol error carries the FTP reply to answer with."""

from __future__ import annotations


class GatewayError(Exception):
    """Base of the gateway's own exceptions."""


class ProtocolError(GatewayError):
    """A peer sent something the protocol does not allow.

    `reply_code` is the FTP reply code to answer with and `message` a sentence a person
    understands, used in the reply and the log line alike.
    """

    def __init__(self, message: str, reply_code: int = 501) -> None:
        super().__init__(message)
        self.message = message
        self.reply_code = reply_code


class RemoteProtocolError(ProtocolError):
    """The upstream server misbehaved."""


class ClientProtocolError(ProtocolError):
    """The FTP client misbehaved."""
