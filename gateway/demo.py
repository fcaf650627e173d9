"""`--demo`: a sample upstream FTP server on loopback, so a new user can try the gateway at once.

It is pyftpdlib's server on a temporary directory with a few files, running in a thread of the
gateway's process. Anonymous users may read; user `demo`, password `demo`, may also write.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path

from pyftpdlib.authorizers import DummyAuthorizer
from pyftpdlib.handlers import FTPHandler
from pyftpdlib.servers import FTPServer
from twisted.application.service import Service
from twisted.logger import Logger

from gateway.events import Event
from gateway.logs import forward_stdlib_logger

_log = Logger(namespace="gateway.demo")

_README = """\
This is the ftp-gateway demo upstream server.
Everything you see here travelled through the gateway.
Log in as demo/demo to upload.
"""


class DemoUpstream(Service):
    """A pyftpdlib server bound at construction time, served from a thread while running."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="ftp-gateway-demo-"))
        (self.root / "README.txt").write_text(_README)
        (self.root / "pub").mkdir()
        (self.root / "pub" / "hello.txt").write_text("Hello through the gateway!\n")
        (self.root / "sample.bin").write_bytes(os.urandom(1024 * 1024))
        (self.root / "upload").mkdir()
        authorizer = DummyAuthorizer()
        authorizer.add_anonymous(str(self.root))
        authorizer.add_user("demo", "demo", str(self.root), perm="elradfmwMT")
        handler = type("DemoHandler", (FTPHandler,), {"authorizer": authorizer})
        handler.banner = "ftp-gateway demo upstream (pyftpdlib) ready."
        self.server = FTPServer(("127.0.0.1", 0), handler)
        self.port: int = self.server.address[1]
        self._thread: threading.Thread | None = None

    def startService(self) -> None:
        super().startService()
        from twisted.internet import reactor

        # pyftpdlib logs with the standard library; without this its ordinary lines would
        # reach twistd's log through stderr, as errors.
        forward_stdlib_logger("pyftpdlib", _log, reactor)
        self._thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"handle_exit": False}, daemon=True
        )
        self._thread.start()
        _log.info(
            "Demo upstream serving {root} on 127.0.0.1:{port}",
            root=str(self.root),
            port=self.port,
            event=Event.DEMO_STARTED,
        )

    def stopService(self) -> None:
        super().stopService()
        self.server.close_all()
        shutil.rmtree(self.root, ignore_errors=True)
