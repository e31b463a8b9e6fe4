"""Schemathesis hooks for server/tests/schemathesis.rs.

`ed25519-public-key` (the format of `public_key` in POST /api/auth/public-keys) is a string no
regular expression describes: url-safe base64 of 32 bytes that are a point of the Ed25519 curve.
Generated from real key pairs, so schema-valid requests are ones the server must accept.
"""

import base64

import schemathesis
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from hypothesis import strategies as st


def _public_key(seed: bytes) -> str:
    raw = Ed25519PrivateKey.from_private_bytes(seed).public_key().public_bytes(Encoding.Raw, PublicFormat.Raw)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


schemathesis.openapi.format("ed25519-public-key", st.binary(min_size=32, max_size=32).map(_public_key))
