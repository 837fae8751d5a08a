"""tus conformance with an independent client (tuspy, from PyPI).

Usage: conformance.py <endpoint> <api token> <other account's token> <movie file>

1. tuspy uploads the movie in 64 KiB chunks, each with a sha1
   Upload-Checksum, stops halfway, then a second tuspy uploader resumes
   from the upload's URL (as a client restarted after a crash would).
2. On an upload tuspy created, the answers the protocol names for bad
   requests, each sent with the same HTTP library tuspy uses: a wrong
   Upload-Offset 409, a checksum that does not match 460 (the chunk
   discarded), an unsupported algorithm 400, a wrong Content-Type 415, a
   chunk past the declared length 413, an Upload-Length past the server's
   Tus-Max-Size 413, another account's upload 404, an unknown one 404, and
   termination 204 then 404.
Prints `asset <id>`: the movie of part 1, from the Asset-Id header.
"""

import base64
import hashlib
import os
import sys

import requests
from tusclient import client

endpoint, token, other_token, path = sys.argv[1:5]
size = os.path.getsize(path)
auth = {"Authorization": "Bearer " + token}
tus = client.TusClient(endpoint, headers=auth)
V = {"Tus-Resumable": "1.0.0"}

# 1. Upload, stop, resume.
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

head = requests.head(url, headers={**V, **auth})
assert head.status_code == 200, head.status_code
assert int(head.headers["Upload-Offset"]) == size, head.headers
asset = head.headers.get("Asset-Id")
assert asset, head.headers

# 2. The protocol's answers to bad requests, on an upload tuspy creates.
options = requests.options(endpoint)
assert options.status_code == 204, options.status_code
max_size = int(options.headers["Tus-Max-Size"])
probe = tus.uploader(
    path, chunk_size=64 * 1024, metadata={"filename": "probe.webm", "title": "Probe"}
)
bad_url = probe.create_url()
with open(path, "rb") as f:
    chunk = f.read(1000)


def patch(u, offset, body, headers=None, who=auth):
    h = {**V, **who, "Upload-Offset": str(offset),
         "Content-Type": "application/offset+octet-stream"}
    h.update(headers or {})
    return requests.patch(u, data=body, headers=h)


def expect(r, status, what, code=None):
    assert r.status_code == status, (what, r.status_code, r.text)
    if code is not None:
        assert r.json()["error"]["code"] == code, (what, r.text)
    print("ok", status, what, flush=True)


def b64(digest):
    return base64.b64encode(digest).decode()


expect(patch(bad_url, 7, chunk), 409, "wrong offset", "offset_mismatch")
expect(
    patch(bad_url, 0, chunk, {"Upload-Checksum": "sha256 " + b64(hashlib.sha256(b"x").digest())}),
    460, "checksum mismatch", "checksum_mismatch",
)
r = requests.head(bad_url, headers={**V, **auth})
assert r.headers["Upload-Offset"] == "0", ("the mismatched chunk was kept", r.headers)
expect(
    patch(bad_url, 0, chunk, {"Upload-Checksum": "md5 " + b64(hashlib.md5(chunk).digest())}),
    400, "unsupported checksum algorithm", "checksum_algorithm_unsupported",
)
expect(
    patch(bad_url, 0, chunk, {"Content-Type": "application/octet-stream"}),
    415, "wrong content type",
)
expect(patch(bad_url, 0, b"\0" * (size + 1)), 413, "past the declared length", "past_upload_length")
expect(
    requests.post(endpoint, headers={**V, **auth, "Upload-Length": str(max_size + 1)}),
    413, "longer than Tus-Max-Size", "too_large",
)
expect(patch(bad_url, 0, chunk, who={"Authorization": "Bearer " + other_token}), 404,
       "another account's upload")
expect(requests.head(bad_url, headers={**V, "Authorization": "Bearer " + other_token}), 404,
       "another account's upload (HEAD)")
unknown = bad_url.rsplit("/", 1)[0] + "/" + "0" * 32
expect(requests.head(unknown, headers={**V, **auth}), 404, "unknown upload")
expect(patch(bad_url, 0, chunk, {"Upload-Checksum": "sha1 " + b64(hashlib.sha1(chunk).digest())}),
       204, "a good chunk")
expect(requests.delete(bad_url, headers={**V, **auth}), 204, "termination")
expect(requests.head(bad_url, headers={**V, **auth}), 404, "terminated upload")

print("asset", asset, flush=True)
