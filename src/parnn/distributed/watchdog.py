"""Collectives that cannot hang: a rank that stops answering ends the whole job, naming it.

MPI's blocking collectives wait forever for a rank that is alive but not progressing (SIGSTOP,
a hung file system, a debugger), and MPICH waits by spinning, so every other rank burns a core
while it waits. Watched(comm, timeout) has the calls parnn's MPI code makes (Allreduce,
Iallreduce + wait, Bcast, Gather, Gatherv, the bytes helpers built on them, the pickled
gather and allgather of small records, Split_type, Get_rank, Get_size, Abort) and runs each
as a non-blocking request that it waits for itself:

- polling: it spins on Test() for SPIN seconds (a collective between ranks in step completes
  well within that, so the training loop keeps its speed), then sleeps between tests, backing
  off to NAP seconds: a rank waiting for a slow peer uses next to no CPU;
- the watchdog: after `timeout` seconds it pings every other rank (point-to-point, a tag of its
  own). A rank waiting in Watched answers from its polling loop; a rank that does not answer
  within GRACE seconds is silent. The lowest rank that answered prints one line naming the
  silent ranks, and calls Abort, which ends every rank (a stopped one too).

Calls without a non-blocking form in mpi4py (the pickled gather/allgather, Split_type) wait
in a watched Ibarrier first, so that once everyone is there the call itself returns at once.
timeout 0 turns all of this off: the plain blocking calls, as before.
"""

from __future__ import annotations

import sys
import time

import numpy as np

SPIN = 0.02       # seconds of busy polling before a wait starts to sleep
NAP = 0.05        # the longest sleep between two tests of a request
GRACE = 3.0       # seconds a pinged rank has to answer
PING, PONG = 7301, 7302   # point-to-point tags, apart from everything else (collectives never
                          # match point-to-point messages)


class Watched:
    """comm (an mpi4py Intracomm) with watched collectives; see the module's docstring."""

    def __init__(self, comm, timeout=60.0, say=None):
        from mpi4py import MPI

        self.comm, self.timeout, self.MPI = comm, float(timeout), MPI
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.say = say or _stderr

    # --- what parnn's MPI code calls -----------------------------------------------------------

    def Get_rank(self):
        return self.rank

    def Get_size(self):
        return self.size

    def Abort(self, code=1):
        self.comm.Abort(code)

    def Iallreduce(self, sendbuf, recvbuf, op=None):
        """Started only: finish it with wait(request), which watches it."""
        return self.comm.Iallreduce(sendbuf, recvbuf, op=op if op is not None else self.MPI.SUM)

    def Allreduce(self, sendbuf, recvbuf, op=None):
        op = op if op is not None else self.MPI.SUM
        if not self.timeout:
            return self.comm.Allreduce(sendbuf, recvbuf, op=op)
        self.wait(self.comm.Iallreduce(sendbuf, recvbuf, op=op), "Allreduce")

    def Bcast(self, buf, root=0):
        if not self.timeout:
            return self.comm.Bcast(buf, root=root)
        self.wait(self.comm.Ibcast(buf, root=root), "Bcast")

    def Gather(self, sendbuf, recvbuf, root=0):
        if not self.timeout:
            return self.comm.Gather(sendbuf, recvbuf, root=root)
        self.wait(self.comm.Igather(sendbuf, recvbuf, root=root), "Gather")

    def Gatherv(self, sendbuf, recvbuf, root=0):
        if not self.timeout:
            return self.comm.Gatherv(sendbuf, recvbuf, root=root)
        self.wait(self.comm.Igatherv(sendbuf, recvbuf, root=root), "Gatherv")

    def Barrier(self):
        if not self.timeout:
            return self.comm.Barrier()
        self.wait(self.comm.Ibarrier(), "Barrier")

    # Bytes (a checkpoint as its file's bytes): a length, then the buffer; nothing pickled.

    def bcast_bytes(self, data, root=0):
        """root's bytes on every rank (data is ignored on the others)."""
        n = np.array([len(data) if self.rank == root else 0], np.int64)
        self.Bcast(n, root)
        buf = np.frombuffer(data, np.uint8).copy() if self.rank == root else \
            np.empty(int(n[0]), np.uint8)
        self.Bcast(buf, root)
        return buf.tobytes()

    def gather_bytes(self, data, root=0):
        """[every rank's bytes, in rank order] on root; None on the others."""
        counts = np.empty(self.size, np.int64) if self.rank == root else None
        self.Gather(np.array([len(data)], np.int64), counts, root)
        mine = np.frombuffer(data, np.uint8)
        if self.rank != root:
            self.Gatherv(mine, None, root)
            return None
        everyone = np.empty(int(counts.sum()), np.uint8)
        self.Gatherv(mine, (everyone, counts), root)
        ends = np.cumsum(counts)
        return [everyone[end - n:end].tobytes() for end, n in zip(ends, counts)]

    def gather(self, obj, root=0):
        self.Barrier()
        return self.comm.gather(obj, root=root)

    def allgather(self, obj):
        self.Barrier()
        return self.comm.allgather(obj)

    def Split_type(self, kind):
        self.Barrier()
        return self.comm.Split_type(kind)

    # --- waiting -------------------------------------------------------------------------------

    def wait(self, request, what="a collective"):
        """Until request completes: spin, then sleep; ping the others after `timeout` s."""
        if not self.timeout:
            request.Wait()
            return
        start = time.monotonic()
        nap, asked = 1e-4, False
        # Ask early enough that the answer is in when `timeout` seconds are up.
        grace = min(GRACE, self.timeout / 4)
        while not request.Test():
            waited = time.monotonic() - start
            if waited < SPIN:
                continue
            self._answer_pings()
            if waited >= self.timeout - grace and not asked:
                asked = True
                silent, alive = self._ping_all(request, grace)
                if silent is None:          # completed while we asked
                    return
                if self.rank == min(alive):
                    self._end(silent, what)
            elif asked and waited >= 2 * self.timeout:
                self._end([], what)         # the speaker never spoke: speak ourselves
            time.sleep(nap)
            nap = min(NAP, nap * 2)

    def _answer_pings(self):
        MPI, status = self.MPI, self.MPI.Status()
        while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=PING, status=status):
            who = status.Get_source()
            self.comm.Recv(np.empty(1, np.int64), source=who, tag=PING)
            self.comm.Send(np.array([self.rank], np.int64), dest=who, tag=PONG)

    def _ping_all(self, request, grace):
        """(silent ranks, ranks that answered and this one), or (None, None) if the request
        completed meanwhile."""
        MPI, status = self.MPI, self.MPI.Status()
        others = [r for r in range(self.size) if r != self.rank]
        for r in others:
            self.comm.Send(np.array([self.rank], np.int64), dest=r, tag=PING)
        answered, deadline = set(), time.monotonic() + grace
        while time.monotonic() < deadline and len(answered) < len(others):
            if request.Test():
                return None, None
            self._answer_pings()
            while self.comm.Iprobe(source=MPI.ANY_SOURCE, tag=PONG, status=status):
                who = status.Get_source()
                self.comm.Recv(np.empty(1, np.int64), source=who, tag=PONG)
                answered.add(who)
            time.sleep(0.01)
        return [r for r in others if r not in answered], sorted({self.rank, *answered})

    def _end(self, silent, what):
        """One line naming the silent ranks, then Abort: every rank ends."""
        n = len(silent)
        if n:
            who = (f"rank {silent[0]} of {self.size} has" if n == 1 else
                   f"ranks {', '.join(map(str, silent))} of {self.size} have")
            line = (f"parnn: error: {who} been silent for {self.timeout:g} s (stopped, hung, or "
                    f"far behind the others; rank {self.rank} waited in {what}): stopping all "
                    f"ranks (--rank-timeout {self.timeout:g})")
        else:
            line = (f"parnn: error: rank {self.rank} of {self.size} waited "
                    f"{self.timeout:g} s in {what} while every rank answers: they are not in the "
                    f"same call (mismatched commands?); stopping all ranks (--rank-timeout "
                    f"{self.timeout:g})")
        self.say(line)
        self.abort()

    def abort(self):
        abort_quietly(self.comm, 3)


def abort_quietly(comm, code):
    """MPI Abort (every rank ends) after our one line, without MPICH's own line about it."""
    import os

    # mpiexec forwards stderr through a pipe and Abort kills every rank at once: without a
    # moment's pause the line saying why is sometimes lost on its way.
    sys.stderr.flush()
    time.sleep(0.5)
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
    except OSError:
        pass
    comm.Abort(code)


def _stderr(line):
    print(line, file=sys.stderr, flush=True)
