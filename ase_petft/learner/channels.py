"""How a campaign's coordinator and its walkers talk: messages up, one state down.

Walkers *post* small messages (a label request, a snapshot of their structure, an
event) and read the coordinator's *published state* (the generation to run and where
its checkpoint is, the uncertainty's version, the label budget, stop). Both are plain
data (numbers, strings, lists, dicts: msgpack-able), so the same code runs with walkers
in threads of this process (:class:`LocalChannel`) or as tasks on dask.distributed
workers (:class:`DaskChannel`, through the scheduler).

Model weights and the uncertainty's posterior never travel through a channel: they are
files in the campaign's work directory, and the state names them. On a cluster that
directory must be on a filesystem every worker sees (a shared home or scratch, as
every SLURM/PBS cluster has): checkpoints of foundation models are hundreds of MB,
and a dask scheduler is built for small messages (its docs advise against large
objects in queues and variables), while a shared path costs each walker one read per
generation.
"""

from __future__ import annotations

import queue
import threading
import time
import uuid
from typing import Any, Dict, List, Optional

import numpy as np

__all__ = ["LocalChannel", "DaskChannel", "encode_atoms", "decode_atoms"]


def encode_atoms(atoms) -> Dict[str, Any]:
    """Positions, cell, pbc, numbers and momenta as lists (float64 round-trips exactly)."""
    return {"numbers": atoms.numbers.tolist(), "positions": atoms.positions.tolist(),
            "cell": np.asarray(atoms.cell).tolist(), "pbc": [bool(p) for p in atoms.pbc],
            "momenta": atoms.get_momenta().tolist() if atoms.has("momenta") else None}


def decode_atoms(data: Dict[str, Any]):
    from ase import Atoms

    atoms = Atoms(numbers=data["numbers"], positions=data["positions"], cell=data["cell"],
                  pbc=data["pbc"])
    if data.get("momenta") is not None:
        atoms.set_momenta(np.asarray(data["momenta"], dtype=float))
    return atoms


class LocalChannel:
    """Walkers in threads of the coordinator's process."""

    def __init__(self) -> None:
        self._inbox: "queue.Queue[dict]" = queue.Queue()
        self._state: Dict[str, Any] = {}
        self._lock = threading.Lock()

    def post(self, message: Dict[str, Any]) -> None:
        self._inbox.put(message)

    def receive(self, timeout: float) -> List[Dict[str, Any]]:
        """Every message waiting (waits up to ``timeout`` s for the first)."""
        try:
            messages = [self._inbox.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                messages.append(self._inbox.get_nowait())
            except queue.Empty:
                return messages

    def publish(self, state: Dict[str, Any]) -> None:
        with self._lock:
            self._state = dict(state)

    def state(self) -> Dict[str, Any]:
        with self._lock:
            return dict(self._state)

    def close(self) -> None:
        pass


class DaskChannel:
    """Walkers as tasks on dask.distributed workers: messages through a
    ``distributed.Queue``, the state in a ``distributed.Variable`` (both live on the
    scheduler). Pickles as its name only; each side opens the objects with its own
    client (a worker's task uses the worker's client)."""

    POLL_S = 0.2  # a walker reads the state at most this often (one scheduler round trip)
    STATE_TIMEOUT_S = 10.0  # no state this long: the coordinator is gone, stop

    def __init__(self, name: Optional[str] = None, client=None) -> None:
        self.name = name or f"petft-campaign-{uuid.uuid4().hex[:12]}"
        self._client = client  # None: the default client (a worker's own in a task)
        self._queue = self._variable = None
        self._cached: Optional[Dict[str, Any]] = None
        self._read_at = 0.0

    def __getstate__(self) -> Dict[str, Any]:
        return {"name": self.name}

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__init__(state["name"])

    def _objects(self):
        if self._queue is None:
            from distributed import Queue, Variable

            self._queue = Queue(f"{self.name}-messages", client=self._client)
            self._variable = Variable(f"{self.name}-state", client=self._client)
        return self._queue, self._variable

    def post(self, message: Dict[str, Any]) -> None:
        self._objects()[0].put(message)

    def receive(self, timeout: float) -> List[Dict[str, Any]]:
        messages = list(self._objects()[0].get(batch=True))
        if not messages:
            time.sleep(timeout)
        return messages

    def publish(self, state: Dict[str, Any]) -> None:
        self._objects()[1].set(dict(state))

    def state(self) -> Dict[str, Any]:
        now = time.monotonic()
        if self._cached is None or now - self._read_at > self.POLL_S:
            try:
                self._cached = dict(self._objects()[1].get(timeout=self.STATE_TIMEOUT_S))
            except Exception:  # deleted, or the scheduler is gone: nobody to work for
                self._cached = {**(self._cached or {}), "stop": True}
            self._read_at = now
        return dict(self._cached)

    def close(self) -> None:
        if self._queue is not None:
            for release in (self._queue.close, self._variable.delete):
                try:
                    release()
                except Exception:  # the scheduler may be gone already
                    pass
