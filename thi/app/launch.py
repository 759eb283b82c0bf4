"""Serve the search page, and start it as a subprocess that says when it listens.

``serve`` prints ``READY_LINE`` once uvicorn's sockets are bound, so a caller (the browser test,
``scripts/bench_app.py``) waits for that line on the child's stdout instead of polling the port
on a clock; a child that dies first ends the wait with its output."""
from __future__ import annotations

import subprocess
import threading
from typing import IO, Optional, Sequence

READY_LINE = "[thi.app] ready"


def serve(app, host: str, port: int) -> None:
    """``uvicorn.run`` that prints ``READY_LINE`` (flushed) once the server accepts connections."""
    import uvicorn

    class _Server(uvicorn.Server):
        async def startup(self, sockets=None) -> None:
            await super().startup(sockets=sockets)
            if self.started:
                print(READY_LINE, flush=True)

    _Server(uvicorn.Config(app, host=host, port=port, log_level="warning")).run()


def start_server(cmd: Sequence[str], cwd: str, log: Optional[IO[str]] = None) -> subprocess.Popen:
    """Start ``cmd`` (a process that calls ``serve``) and return once it prints ``READY_LINE``.
    Its output is copied to ``log`` (when given) by a background thread, before and after."""
    proc = subprocess.Popen(list(cmd), cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, bufsize=1)
    seen = []
    for line in proc.stdout:
        seen.append(line)
        if log is not None:
            log.write(line)
        if line.strip() == READY_LINE:
            break
    else:  # stdout closed: the server exited before it listened
        proc.wait()
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode} before serving:\n{''.join(seen)}")

    def _drain() -> None:  # keep reading so the child never blocks on a full pipe
        for rest in proc.stdout:
            if log is not None and not log.closed:
                log.write(rest)

    threading.Thread(target=_drain, daemon=True).start()
    return proc
