"""Run the stage notebooks as a graph: each starts once the stages it reads are done.

``embbench demo`` runs 01-05. Their order is not a chain: 02 (fine-tuning) reads nothing of 01
or 03, while 03 reads 01's cached test embeddings, 04 reads 02's checkpoints and 03's heads, and
05 reads them all (:data:`NEEDS`). One after the other on 2 cores, the cores were 135% busy
(``/usr/bin/time -v``): 01 embeds at ~140%, 02 trains at ~150% (decoding inline between steps),
and 03's top-tuning searches (tiny Keras MLPs) run on one core for ~45 of its ~85 s. So
:func:`run_graph` runs two notebooks at once where the graph allows (on 2 or more cores;
``slots``): 01 and 02 start together, 03 when 01 is done, 04 when 02 and 03 are, then 05.

02 runs **in the background** (:data:`BACKGROUND`): its kernel is niced
(:func:`embbench._threads.lower_priority`), so the chain 01 -> 03 -> 04 -> 05, the longer one,
keeps the cores it uses and 02 fills what it leaves (the idle second core of 03's searches, the
gaps between 01's models); once the chain waits for 02, 02 has the cores. Tried first without
the nice (the same schedule by hand), the two shared the cores evenly: 01 took 70 s instead of
46 s alone, and 03 then ran ~50 s alone; niced, 01 takes 51-57 s and 02 ends before 03. Each
notebook keeps its own thread budget (2 intra-op threads on 2 cores): the results do not depend
on the schedule (the records of both schedules are compared in the README's figures).

Two notebooks cannot open one Milvus Lite file (one process holds it), so while notebooks run at
once a ``milvus-lite server`` serves the file the notebooks would have opened
(``<runs_dir>/milvus.db``, log ``<runs_dir>/milvus-lite-server.log``) on a free local port, and
every notebook whose ``milvus_uri`` is empty gets that server's address (its executed copy shows
it). Collections, and so the index, are the same. A notebook with its own ``milvus_uri`` (a
Milvus server) keeps it. Where the server cannot start, the file is open in another process (a
JupyterLab kernel that ran a stage), or there is one core, the notebooks run one after the other
as before.
"""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from embbench._threads import available_cores
from embbench.config import current_shared_params_files, read_params_files, shared_params_files
from embbench.notebooks import REPORT_NOTEBOOK, WarmKernel, render_report, run_notebook
from embbench.paths import reports_dir, runs_dir
from embbench.services import lite_lock_holder
from embbench.stages import config_for

logger = logging.getLogger(__name__)

__all__ = ["BACKGROUND", "NEEDS", "LiteServer", "run_graph"]

# notebook -> the notebooks whose results it reads (a notebook not listed reads all before it)
NEEDS: dict[str, tuple[str, ...]] = {
    "01_embed": (),
    "02_finetune": (),
    "03_toptune": ("01_embed",),  # its test split's pretrained vectors: 01's cache
    "04_crosstune": ("02_finetune", "03_toptune"),  # checkpoints and top-tuned heads
    "05_analysis": ("01_embed", "02_finetune", "03_toptune", "04_crosstune"),
}
# notebooks off the longest chain: niced, they run on what the others leave
BACKGROUND = frozenset({"02_finetune"})
BACKGROUND_NICE = 10
Step = tuple[str, list[Path]]


class LiteServer:
    """A ``milvus-lite server`` serving one Milvus Lite file to several processes, on localhost.

    Args:
        path: The ``.db`` file (created by the server if missing).
        log: Where the server's output goes.
    """

    def __init__(self, path: Path, log: Path) -> None:
        self.path, self.log = Path(path), Path(log)
        self.proc: subprocess.Popen | None = None
        self.uri = ""

    def start(self, timeout: float = 60.0) -> str:
        """Start the server; return its ``http://127.0.0.1:PORT`` once it accepts connections.

        Raises:
            RuntimeError: No ``milvus-lite`` command beside this interpreter, or it exited or
                did not answer within ``timeout`` seconds (the message names the log).
        """
        exe = Path(sys.executable).parent / "milvus-lite"
        if not exe.is_file():
            raise RuntimeError(f"no {exe} (milvus-lite is not installed in this environment)")
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        cmd = [str(exe), "server", "--data-dir", str(self.path), "--host", "127.0.0.1"]
        with self.log.open("a") as out:
            self.proc = subprocess.Popen(
                [*cmd, "--port", str(port)], stdout=out, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                socket.create_connection(("127.0.0.1", port), 1).close()
                self.uri = f"http://127.0.0.1:{port}"
                return self.uri
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"milvus-lite server did not answer on port {port}; see {self.log}")

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 20 s)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)


def _needs(steps: Sequence[Step]) -> dict[str, set[str]]:
    names = [name for name, _ in steps]
    return {
        name: {n for n in NEEDS.get(name, tuple(names[:i])) if n in names}
        for i, name in enumerate(names)
    }


def _overlap(needs: Mapping[str, set[str]]) -> bool:
    """Whether two notebooks may run at once: neither reads the other, even through a third."""
    before: dict[str, set[str]] = {}
    for name in needs:  # in order: what a notebook needs comes before it
        before[name] = set(needs[name]).union(*(before.get(n, set()) for n in needs[name]))
    names = list(needs)
    return any(
        a not in before[b] and b not in before[a]
        for i, a in enumerate(names)
        for b in names[i + 1 :]
    )


def _lite_users(steps: Sequence[Step]) -> list[str]:
    """The notebooks that would open the default Milvus Lite file (``milvus_uri`` empty)."""
    users = []
    for name, files in steps:
        params, origin = read_params_files(files)
        cfg = config_for(name).from_params(params, origin)
        if getattr(cfg, "milvus_uri", None) == "":
            users.append(name)
    return users


def run_graph(steps: Sequence[Step], *, slots: int | None = None) -> tuple[list[Path], Path | None]:
    """Run notebooks, each once the ones it reads are done, up to ``slots`` at once.

    Args:
        steps: ``(notebook, params files)`` in the order they would run one by one;
            ``05_analysis`` is rendered as the HTML report.
        slots: Notebooks at once (default 2 on 2 or more cores, else 1: one after the other).

    Returns:
        The executed notebooks in ``steps``' order and the report's path (``None`` without 05).

    Raises:
        The first notebook's error; the notebooks running then are finished first (nothing
        they compute is lost), none is started after it.
    """
    needs = _needs(steps)
    slots = slots or (2 if available_cores() >= 2 and _overlap(needs) else 1)
    overrides: dict[str, dict[str, Any]] = {}
    server = None
    users = _lite_users(steps) if slots > 1 else []
    holder = lite_lock_holder(runs_dir() / "milvus.db") if users else None
    if holder:  # a JupyterLab kernel that ran a stage keeps the file open until it stops
        logger.warning(
            "%s is open in process %d (%s): it cannot be served to notebooks running at once; "
            "they run one after the other", runs_dir() / "milvus.db", *holder,
        )  # fmt: skip
        users, slots = [], 1
    if users:
        server = LiteServer(runs_dir() / "milvus.db", runs_dir() / "milvus-lite-server.log")
        try:
            uri = server.start()
            overrides = {name: {"milvus_uri": uri} for name in users}
            logger.info(
                "notebooks run %d at once: a milvus-lite server serves %s to them at %s "
                "(log %s)", slots, server.path, uri, server.log,
            )  # fmt: skip
        except RuntimeError as err:
            logger.warning("%s: the notebooks run one after the other", err)
            server, slots = None, 1
    try:
        return _Schedule(steps, needs, overrides, slots).run()
    finally:
        if server is not None:
            server.stop()


class _Schedule:
    """The loop of :func:`run_graph`: start what is ready, warm the next kernel, collect."""

    def __init__(
        self,
        steps: Sequence[Step],
        needs: Mapping[str, set[str]],
        overrides: Mapping[str, dict[str, Any]],
        slots: int,
    ) -> None:
        self.steps, self.needs, self.overrides, self.slots = list(steps), needs, overrides, slots
        self.outputs: dict[str, Path] = {}
        self.report: Path | None = None
        self.kernels: dict[str, WarmKernel] = {}  # started, taken or not: closed at the end

    def _nice(self, name: str) -> int:
        return BACKGROUND_NICE if self.slots > 1 and name in BACKGROUND else 0

    def _kernel(self, name: str) -> WarmKernel:
        if name not in self.kernels:
            self.kernels[name] = WarmKernel(name, nice=self._nice(name))
        return self.kernels[name]

    def _one(
        self, name: str, files: list[Path], kernel: WarmKernel, shared: frozenset[str]
    ) -> tuple[Path, Path | None]:
        """Run notebook ``name`` on ``kernel`` (a worker thread); its output and report."""
        with shared_params_files(shared):
            if name == REPORT_NOTEBOOK:
                report = render_report(params_files=files, kernel=kernel)
                return reports_dir() / "notebooks" / REPORT_NOTEBOOK / "latest.ipynb", report
            progress = not self._nice(name)  # one papermill bar on the terminal: the chain's
            out = run_notebook(
                name, files, self.overrides.get(name), kernel=kernel, progress=progress
            )
            return out, None

    def run(self) -> tuple[list[Path], Path | None]:
        pending = list(self.steps)
        running: dict[Future, str] = {}
        done: set[str] = set()
        failure: BaseException | None = None
        pool = ThreadPoolExecutor(self.slots, thread_name_prefix="notebook")
        # `embbench demo -f` marks its files shared in this thread's context; that marker alone
        # goes to the notebooks' threads (a copy of the whole context would give them this
        # thread's event loop too, which jupyter_client keeps in a context variable)
        shared = current_shared_params_files()
        try:
            while pending or running:
                while failure is None and pending and len(running) < self.slots:
                    ready = [s for s in pending if self.needs[s[0]] <= done]
                    if not ready:
                        break
                    name, files = ready[0]
                    pending.remove(ready[0])
                    others = ", ".join(running.values())
                    logger.info(
                        "[stage %d/%d] %s%s%s", self.steps.index((name, files)) + 1,
                        len(self.steps), name, f" (alongside {others})" if others else "",
                        f", at nice {self._nice(name)}" if self._nice(name) else "",
                    )  # fmt: skip
                    kernel = self._kernel(name)  # kernels are made and closed here only
                    running[pool.submit(self._one, name, files, kernel, shared)] = name
                if failure is None and pending:  # its imports done while the others run
                    self._kernel(pending[0][0])
                if not running:  # a failure, with nothing left running
                    break
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    name = running.pop(future)
                    if future.exception() is None:
                        self.outputs[name], report = future.result()
                        self.report = report or self.report
                        done.add(name)
                    elif failure is None:
                        failure = future.exception()
                        if running:
                            logger.info(
                                "%s failed: finishing %s, starting nothing else",
                                name, ", ".join(running.values()),
                            )  # fmt: skip
        finally:
            for kernel in self.kernels.values():  # untaken, or a Ctrl-C: their kernels stop
                kernel.close()
            pool.shutdown(wait=True, cancel_futures=True)
        if failure is not None:
            raise failure
        return [self.outputs[name] for name, _ in self.steps], self.report
