#!/usr/bin/env python3
"""Re-derive seal-v1.json and wrap-v1.json from docs/sealed-blob.md with
Python's `cryptography` package, independently of the Rust code.

    python3 shared/tests/vectors/check_vectors.py
"""
import hashlib
import json
import pathlib
import struct
import sys

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

HERE = pathlib.Path(__file__).parent


def seal(v):
    seg = v["segment_size"]
    salt = bytes.fromhex(v["salt"])
    prefix = bytes.fromhex(v["nonce_prefix"])
    plain = bytes.fromhex(v["plaintext"])
    header = b"SLMB" + bytes([1]) + struct.pack(">II", seg, v["key_id"]) + salt + prefix
    assert len(header) == 52
    key = HKDF(
        algorithm=hashes.SHA256(),
        length=32,
        salt=salt,
        info=b"slmedia seal v1" + v["asset_id"].encode(),
    ).derive(bytes.fromhex(v["data_key"]))
    aead = AESGCM(key)
    chunks = [plain[i : i + seg] for i in range(0, len(plain), seg)] or [b""]
    out = header
    for i, chunk in enumerate(chunks):
        last = 1 if i == len(chunks) - 1 else 0
        nonce = prefix + struct.pack(">I", i) + bytes([last])
        out += aead.encrypt(nonce, chunk, header)
    return out


def main():
    failures = 0
    for v in json.loads((HERE / "seal-v1.json").read_text())["vectors"]:
        sealed = seal(v)
        ok = sealed.hex() == v["sealed"] and hashlib.sha256(sealed).hexdigest() == v["blob_id"]
        print(("ok  " if ok else "FAIL"), "seal:", v["name"])
        failures += not ok
    for v in json.loads((HERE / "wrap-v1.json").read_text())["vectors"]:
        key_id = struct.pack(">I", v["master_key_id"])
        nonce = bytes.fromhex(v["nonce"])
        aad = b"slmedia wrap v1" + key_id + v["asset_id"].encode()
        ct = AESGCM(bytes.fromhex(v["master_key"])).encrypt(nonce, bytes.fromhex(v["data_key"]), aad)
        ok = (key_id + nonce + ct).hex() == v["wrapped"]
        print(("ok  " if ok else "FAIL"), "wrap")
        failures += not ok
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
