"""ftp-gateway: an FTP proxy gateway on Twisted."""

__version__ = "0.1.0"
