"""Shared fixtures."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from statetable import StateTable

# Every StateTable method that can change the VTW pools.
_POOL_CHANGING = (
    "test",
    "purge",
    "insert",
    "clear",
    "kill_vestigial",
    "remove_vestigial_by_id",
    "set_vtw_enabled",
    "set_vtw_entries",
)


@pytest.fixture
def checked_pools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run ``Vtw.check()`` (the pools' invariants) after every table call that can change
    the pools, so a test fails at the step that broke one, not later. Opt in with
    ``pytestmark = pytest.mark.usefixtures("checked_pools")``."""

    def checked(method: Callable[..., Any]) -> Callable[..., Any]:
        def call(self: StateTable, *args: Any, **kwargs: Any) -> Any:
            result = method(self, *args, **kwargs)
            self.vtw.check()
            return result

        return call

    for name in _POOL_CHANGING:
        monkeypatch.setattr(StateTable, name, checked(getattr(StateTable, name)))
