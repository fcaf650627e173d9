"""`python -m gateway`: the same as the `ftp-gateway` command (gateway.cli)."""

from __future__ import annotations

from gateway.cli import main

if __name__ == "__main__":
    main()
