"""Keep libp2p's log records out of the user's terminal.

py-libp2p logs on its own `libp2p` logger, which has no handler and does not propagate, so Python's
last-resort handler prints every WARNING to stderr (redial failures after a peer leaves, DHT stream
hiccups). Those are routine on a swarm and would bury a provider's or the status command's output.
`route_libp2p_logs` gives that logger exactly one handler: a log file when one is named, otherwise
a handler that re-emits each record at DEBUG on `cipherswarm.node.libp2p`, so it still reaches
whatever logging the application configured, just not as a warning.
"""

from __future__ import annotations

import logging
from pathlib import Path

_FORWARD_TO = "cipherswarm.node.libp2p"


class _DemoteToDebug(logging.Handler):
    """Re-emits libp2p's records at DEBUG on our own logger."""

    def emit(self, record: logging.LogRecord) -> None:
        target = logging.getLogger(_FORWARD_TO)
        if target.isEnabledFor(logging.DEBUG):
            target.debug("%s: %s", record.name, record.getMessage())


def route_libp2p_logs(log_file: Path | None = None) -> None:
    """Send libp2p's records to `log_file` (appended, with its level) or demote them to DEBUG.

    Idempotent: calling it again replaces the previous routing.
    """
    handler: logging.Handler
    if log_file is None:
        handler = _DemoteToDebug()
    else:
        handler = logging.FileHandler(log_file)
        handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger("libp2p")
    for old in root.handlers:
        old.close()
    root.handlers = [handler]
    root.propagate = False


def configure_logging(level: str = "INFO", log_file: Path | None = None) -> None:
    """Logging for the command line: our records to stderr at `level`; libp2p's to `log_file`
    if given, else demoted as above."""
    logging.basicConfig(level=level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    route_libp2p_logs(log_file)
