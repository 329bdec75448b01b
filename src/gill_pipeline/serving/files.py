"""Answer images kept in memory for `GET /v1/files/<id>` (with `--image-urls`): PNG bytes by id, oldest dropped
first beyond `max_items`, so a long-running server does not grow."""

import threading
import uuid
from collections import OrderedDict


class ImageStore:
    def __init__(self, max_items: int = 256):
        self.max_items = max_items
        self._items: OrderedDict[str, bytes] = OrderedDict()
        self._lock = threading.Lock()

    def put(self, png: bytes) -> str:
        file_id = f"file-{uuid.uuid4().hex}"
        with self._lock:
            self._items[file_id] = png
            while len(self._items) > self.max_items:
                self._items.popitem(last=False)
        return file_id

    def get(self, file_id: str) -> bytes | None:
        with self._lock:
            return self._items.get(file_id)

    def __len__(self) -> int:
        return len(self._items)
