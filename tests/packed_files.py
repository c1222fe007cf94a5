"""Crafting packed files for the tests: a header rewritten with a valid SHA-256, as anyone can.

The checksum proves that a file is intact, not where it came from: these helpers
rewrite a real export's safetensors header (or write one from scratch) and put
the right digest in, so the loader's other defences are what the tests reach.
"""
from __future__ import annotations

import hashlib
import json
import struct

ZERO = "0" * 64


def split(blob: bytes) -> tuple[dict, bytes]:
  """(the JSON header, the data section) of a safetensors file."""
  (n,) = struct.unpack_from("<Q", blob)
  return json.loads(blob[8:8 + n]), blob[8 + n:]


def assemble(header_bytes: bytes, data: bytes) -> bytes:
  """A file of these header bytes (holding the 64-zero placeholder once, or no checksum) and data,
  its checksum computed and written in."""
  body = struct.pack("<Q", len(header_bytes)) + header_bytes + data
  if header_bytes.count(ZERO.encode()) != 1:
    return body
  digest = hashlib.sha256(body).hexdigest().encode()
  return struct.pack("<Q", len(header_bytes)) + header_bytes.replace(ZERO.encode(), digest) + data


def rewrite(blob: bytes, change) -> bytes:
  """``blob`` with its header changed in place by ``change(header)`` and a valid checksum."""
  header, data = split(blob)
  change(header)
  if "__metadata__" in header:
    header["__metadata__"]["sha256"] = ZERO
  return assemble(json.dumps(header).encode(), data)


def rewrite_model(blob: bytes, change) -> bytes:
  """``blob`` with the ``model`` metadata (``{"spec": ..., "image_shape": ...}``) changed by ``change(model)``."""
  def apply(header):
    model = json.loads(header["__metadata__"]["model"])
    change(model)
    header["__metadata__"]["model"] = json.dumps(model)
  return rewrite(blob, apply)


def rewrite_spec(blob: bytes, change) -> bytes:
  """``blob`` with its model spec changed by ``change(spec)``."""
  return rewrite_model(blob, lambda model: change(model["spec"]))
