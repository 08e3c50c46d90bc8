"""The event loop syncer delivers on.

uvloop's where it is installed (a dependency on Linux and macOS), else asyncio's own. On this
workload uvloop's loop gives one delivery process about a fifth more calls per second (see
bench/README.md); everything else is the same code on either loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

try:
    import uvloop

    def run(main: Coroutine[Any, Any, T]) -> T:
        """``asyncio.run`` on syncer's event loop: a new loop, closed when ``main`` is done."""
        return uvloop.run(main)

except ImportError:  # Windows: asyncio's loop

    def run(main: Coroutine[Any, Any, T]) -> T:
        return asyncio.run(main)
