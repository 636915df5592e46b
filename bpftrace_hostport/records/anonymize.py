"""Client-address pseudonyms: keyed, prefix-preserving (Crypto-PAn, via yacryptopan).

Two addresses sharing their first k bits map to two pseudonyms sharing their first k bits,
so subnets stay visible (clients of one /24 stay in one /24) while the addresses do not.
yacryptopan implements Crypto-PAn for IPv4 (32 bits) and IPv6 (128 bits) with one 32-byte
key; any key given is first hashed to 32 bytes with SHA-256, so a passphrase file works.
The same key gives the same pseudonyms across runs and nodes; the key is never written.
"""
from __future__ import annotations

import hashlib
import ipaddress
import os
from typing import Dict, List, Optional, Tuple

import numpy as np

from bpftrace_hostport.records.batch import ADDR, FlowBatch, group_rows

_BITS = {4: 32, 6: 128}


def new_key() -> bytes:
    """A random key, for `--anonymize` without a key file (pseudonyms then differ per run)."""
    return os.urandom(32)


class Anonymizer:
    def __init__(self, key: bytes, cache_limit: int = 1_000_000):
        from yacryptopan import CryptoPAn
        self._pan = CryptoPAn(hashlib.sha256(key).digest())
        # Crypto-PAn costs one AES block per bit (32 for IPv4, 128 for IPv6): convert each
        # distinct address once and remember it (a node sees few distinct clients).
        self._cache: Dict[Tuple[int, int], int] = {}
        self._limit = cache_limit

    def map_int(self, value: int, family: int) -> int:
        """The pseudonym of an address given as an integer of its family's width."""
        key = (value, family)
        out = self._cache.get(key)
        if out is None:
            if len(self._cache) >= self._limit:
                self._cache.clear()
            out = self._cache[key] = self._pan.anonymize_bin(value, family)
        return out

    def map_text(self, ip: str) -> str:
        """'10.1.2.3' -> its pseudonym as text (IPv6 in canonical, compressed form)."""
        addr = ipaddress.ip_address(ip)
        return str(type(addr)(self.map_int(int(addr), addr.version)))

    def map_cidr(self, cidr: str) -> str:
        """'10.1.0.0/16' -> the pseudonym network of the same length (prefix preservation makes
        the first bits of the result depend only on the network's bits; the rest are zeroed)."""
        net = ipaddress.ip_network(cidr, strict=False)
        bits = _BITS[net.version]
        mapped = self.map_int(int(net.network_address), net.version)
        mask = ((1 << bits) - 1) ^ ((1 << (bits - net.prefixlen)) - 1)
        return str(ipaddress.ip_network((mapped & mask, net.prefixlen)))

    def map_column(self, addrs: np.ndarray, families: np.ndarray) -> np.ndarray:
        """A column of 16-byte addresses (IPv4 in the first 4 bytes) -> their pseudonyms, in a new
        array. Families other than 4 and 6 are left as they are."""
        if len(addrs) == 0:
            return np.zeros(0, dtype=ADDR)
        first, inv = group_rows(addrs, families)           # each distinct address mapped once
        mapped = np.array([self._map_raw(addrs[i].tobytes(), int(families[i])) for i in first.tolist()],
                          dtype=ADDR)
        return mapped[inv]

    def _map_raw(self, raw: bytes, family: int) -> bytes:
        width = _BITS.get(family, 0) // 8
        if not width:
            return raw
        value = self.map_int(int.from_bytes(raw[:width], "big"), family)
        return value.to_bytes(width, "big").ljust(16, b"\0")


# -- what every writer of client addresses uses: one way to anonymize each kind of record -----
def batch(anon: Optional[Anonymizer], b: FlowBatch) -> FlowBatch:
    """A copy of a flow batch with pseudonyms for its clients (the caller's batch is left alone)."""
    if anon is None or not len(b):
        return b
    return FlowBatch(dict(b.cols, client_addr=anon.map_column(b["client_addr"], b["family"])),
                     b.pods, b.drop_reasons)


def misses(anon: Optional[Anonymizer], recs: List[dict]) -> List[dict]:
    """Miss records with pseudonyms for their clients."""
    if anon is None:
        return recs
    return [dict(r, client_ip=anon.map_text(r["client_ip"])) if r.get("client_ip") else r for r in recs]


def header(anon: Optional[Anonymizer], h: dict) -> dict:
    """A capture header that says its clients are pseudonyms, its --client networks mapped too
    (they would name the clients)."""
    if anon is None:
        return h
    h = dict(h)
    opts = dict(h.get("options") or {})
    if opts.get("clients"):
        opts["clients"] = [anon.map_cidr(c) for c in opts["clients"]]
    h["options"], h["anonymized"] = opts, True
    return h
