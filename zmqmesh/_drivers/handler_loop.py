"""An asyncio loop on a thread of its own, for the ``async def`` handlers of a sync `Node`.

Imported only when the first such handler runs, so a sync node without them never loads
asyncio (and the ``ssl`` module asyncio brings along).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from concurrent.futures import Future
from typing import Any

__all__ = ["HandlerLoop"]


class HandlerLoop:
    """Runs coroutines on a private event loop thread; `close` stops it (bounded)."""

    def __init__(self, name: str) -> None:
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), name=name, daemon=True)
        self.thread.start()
        ready.wait()

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(ready.set)
        try:
            self.loop.run_forever()
            for task in asyncio.all_tasks(self.loop):
                task.cancel()
            self.loop.run_until_complete(asyncio.sleep(0))  # let the cancelled see it
        finally:
            self.loop.close()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> Future[Any]:
        """Run ``coro`` on the loop; its outcome as a thread-safe future. `RuntimeError` once closed."""
        try:
            return asyncio.run_coroutine_threadsafe(coro, self.loop)
        except RuntimeError:
            coro.close()
            raise

    def close(self, timeout: float = 1.0) -> None:
        """Stop the loop (cancelling what still runs) and wait a bounded time for its thread."""
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:
            return
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)
