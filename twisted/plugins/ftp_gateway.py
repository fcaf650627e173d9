"""twistd plugin: `twistd -n ftp-gateway --help`."""

from twisted.application.service import ServiceMaker

ftp_gateway = ServiceMaker(
    "ftp-gateway", "gateway.tap", "An FTP proxy gateway (forward and reverse).", "ftp-gateway"
)
