"""`python -m gateway.plugincache`: bring Twisted's plugin caches up to date at install time.

Twisted finds endpoint parsers, cred checkers and twistd plugins by scanning the
`twisted/plugins` directories, and rewrites a directory's `dropin.cache` when a plugin file is
newer than it. Installing ftp-gateway adds such a file, so without this step the first start
writes the cache, and a service whose installation is read-only (systemd's
`ProtectSystem=strict`) logs `Unable to write to plugin cache` on every start. Run it after
`pip install`, as the user who installed. Exit status 1 if a cache could not be written.
"""

from __future__ import annotations

import sys

from twisted.logger import LogEvent, formatEvent, globalLogPublisher
from twisted.plugin import IPlugin, getPlugins


def main() -> None:
    problems: list[str] = []

    def observe(event: LogEvent) -> None:
        text = formatEvent(event)
        if "plugin cache" in text.lower():
            problems.append(text)

    globalLogPublisher.addObserver(observe)
    try:
        found = list(getPlugins(IPlugin))
    finally:
        globalLogPublisher.removeObserver(observe)
    for problem in problems:
        print(f"ftp-gateway: {problem}", file=sys.stderr)
    if problems:
        raise SystemExit(1)
    print(f"ftp-gateway: plugin caches up to date ({len(found)} plugins)")


if __name__ == "__main__":
    main()
