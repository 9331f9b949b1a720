"""The replay log: the last frames a node multicast to its peers, kept for resumption.

Every sequenced frame goes in; the oldest falls out once ``capacity`` frames are held
(``net.pfsync.replay_log``). A peer that reconnects says the last sequence it applied;
if every frame after it is still here, they are resent and the peer is current again
without a bulk update. A larger gap is a miss: the peer gets a bulk update instead.
"""

from __future__ import annotations

from collections import deque

from pfsync.v1 import sync_pb2 as pb


class ReplayLog:
    """A bounded window of sequenced frames."""

    def __init__(self, capacity: int) -> None:
        self._frames: deque[pb.SyncFrame] = deque(maxlen=max(1, capacity))
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        """How many frames are kept."""
        return self._frames.maxlen or 1

    def frames(self) -> list[pb.SyncFrame]:
        """The frames kept, oldest first."""
        return list(self._frames)

    def resize(self, capacity: int) -> None:
        """Keep up to ``capacity`` frames from now on (the newest are kept)."""
        self._frames = deque(self._frames, maxlen=max(1, capacity))

    def clear(self) -> None:
        """Forget every frame (a gap: whoever resumes from before it needs a bulk)."""
        self._frames.clear()

    def append(self, frame: pb.SyncFrame) -> None:
        """Remember a frame just sent (its ``sequence`` must follow the last one)."""
        self._frames.append(frame)

    def since(self, sequence: int, last: int) -> list[pb.SyncFrame] | None:
        """Frames after ``sequence`` up to ``last``, or None when some are gone."""
        if sequence >= last:
            self.hits += 1
            return []
        if not self._frames or self._frames[0].sequence > sequence + 1:
            self.misses += 1
            return None
        self.hits += 1
        start = sequence + 1 - self._frames[0].sequence
        return [self._frames[i] for i in range(start, len(self._frames))]
