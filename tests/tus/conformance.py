"""tus conformance with an independent client (tuspy, from PyPI).

Usage: conformance.py <endpoint> <api token> <movie file>

Uploads the movie in 64 KiB chunks, each with a sha1 Upload-Checksum,
stops halfway, then resumes from the upload's URL with a second uploader
(as a client restarted after a crash would), and prints `asset <id>`: the
movie the upload became, from the final answer's Asset-Id header.
"""

import os
import sys

from tusclient import client

endpoint, token, path = sys.argv[1:4]
size = os.path.getsize(path)
tus = client.TusClient(endpoint, headers={"Authorization": "Bearer " + token})

first = tus.uploader(
    path,
    chunk_size=64 * 1024,
    metadata={"filename": os.path.basename(path), "title": "Conformance"},
    upload_checksum=True,
)
first.upload(stop_at=size // 2)
url = first.url
assert url and "/api/v1/tus/" in url, url
half = first.get_offset()
assert 0 < half < size, (half, size)
print("stopped at", half, "of", size, flush=True)

second = tus.uploader(path, url=url, chunk_size=64 * 1024, upload_checksum=True)
assert second.offset == half, (second.offset, half)
second.upload()
assert second.offset == size, (second.offset, size)

# The final PATCH's answer names the movie; a HEAD repeats it.
import requests

head = requests.head(
    url, headers={"Tus-Resumable": "1.0.0", "Authorization": "Bearer " + token}
)
assert head.status_code == 200, head.status_code
assert int(head.headers["Upload-Offset"]) == size, head.headers
asset = head.headers.get("Asset-Id")
assert asset, head.headers
print("asset", asset, flush=True)
