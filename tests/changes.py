"""Reading a table's change list in tests (see statetable.events)."""

from __future__ import annotations

from collections.abc import Iterator

from statetable import StateTable
from statetable.events import Event, StateInserted, StateRemoved, StateUpdated
from statetable.state import State


class Recorder:
    """Records a table's changes; a bare State (a packet's update) reads as StateUpdated."""

    def __init__(self, table: StateTable) -> None:
        self.table = table
        table.record_changes()
        self._events: list[Event] = []

    @property
    def events(self) -> list[Event]:
        """Every change so far, oldest first."""
        for ch in self.table.take_changes():
            if type(ch) is State:
                self._events.append(
                    StateUpdated(ch, ch.state, ch.dst.state, ch.state, ch.dst.state)
                )
            else:
                self._events.append(ch)  # type: ignore[arg-type]
        return self._events

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    def kinds(self) -> list[str]:
        """inserted / updated / removed:<reason>, in order."""
        out = []
        for e in self.events:
            if isinstance(e, StateRemoved):
                out.append(f"removed:{e.reason.value}")
            else:
                out.append("inserted" if isinstance(e, StateInserted) else "updated")
        return out

    def clear(self) -> None:
        """Forget what was recorded so far."""
        _ = self.events
        self._events.clear()
