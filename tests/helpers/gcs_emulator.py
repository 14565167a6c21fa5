"""A local Cloud Storage JSON API for the tests: gcp-storage-emulator, taught two things real
GCS does that the clients here rely on.

    python tests/helpers/gcs_emulator.py PORT BUCKET

- Media downloads carry `x-goog-generation` / `x-goog-metageneration`: tensorstore (orbax's
  array store) reads an object's generation from them to make its writes conditional, and
  fails with "Malformed StorageGeneration" without them.
- `objects.move` (`POST .../o/SRC/moveTo/o/DST`): gcsfs renames with it; the emulator answers
  501, which gcsfs retries with back-off for many seconds per file before it falls back to
  copy + delete. Here it is copy + delete, answered at once.
- A listen backlog of 128 connections instead of socketserver's 5: tensorstore and gcsfs open
  many connections at once, and a full backlog drops them into TCP's retry back-off (seconds
  each), which made a checkpoint take minutes. The server still answers one request at a time.
Nothing else changes.
"""

from __future__ import annotations

import http.server
import sys
from functools import partial
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.handlers import objects

_download = objects.download


def download_with_generation(request, response, storage, *args, **kwargs):
    try:
        obj = storage.get_file_obj(request.params["bucket_name"], request.params["object_id"])
        response["x-goog-generation"] = str(obj["generation"])
        response["x-goog-metageneration"] = str(obj["metageneration"])
    except Exception:  # not found: the emulator's own handler answers 404
        pass
    return _download(request, response, storage, *args, **kwargs)


objects.download = download_with_generation  # `objects.get(alt=media)` calls it by name
for _, methods in server.HANDLERS:
    for method, handler in list(methods.items()):
        if handler is _download:
            methods[method] = download_with_generation


def move(request, response, storage, *args, **kwargs):
    request.params["dest_bucket_name"] = request.params["bucket_name"]
    objects.copy(request, response, storage)
    if response.status == HTTPStatus.OK:
        objects._delete(storage, request.params["bucket_name"], request.params["object_id"])


_MOVE = (
    r"^/storage/v1/b/(?P<bucket_name>[-.\w]+)/o/(?P<object_id>.*[^/]+)/moveTo/o/"
    r"(?P<dest_object_id>.*[^/]+)$",
    {server.POST: move},
)
server.HANDLERS = (_MOVE, *server.HANDLERS)  # before the generic object routes


class _Backlog128(http.server.HTTPServer):
    request_queue_size = 128


def _run_api(self):
    handler = partial(server.RequestHandler, self._storage)
    self._httpd = _Backlog128((self._host, self._port), handler)
    self.is_running.set()
    self._httpd.serve_forever()


server.APIThread.run = _run_api

if __name__ == "__main__":
    import logging

    logging.disable(logging.ERROR)  # the emulator logs every 404 a client's probe provokes
    port, bucket = int(sys.argv[1]), sys.argv[2]
    emulator = server.create_server("127.0.0.1", port, in_memory=True, default_bucket=bucket)
    emulator.run()
