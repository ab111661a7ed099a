"""Which MQTT broker a device uses: its home broker and its failover order. Pure: no I/O.

A fleet larger than one Mosquitto holds (a process may open 20,000 files, so one broker
tops out just below 20,000 connections) is spread over N brokers. Every party computes a
device's brokers from its id and the deployment's broker list alone, so nothing has to be
stored or looked up: the coordinator (dispatch to a device it has not heard from yet,
what enrolment tells the device), the agent and the simulator agree by construction.

The order is rendezvous (highest-random-weight) hashing: broker ``i`` scores
``blake2b(f"{i}/{device_id}")`` and a device tries its brokers by descending score. The
first is its home broker; the rest are its failover order. Compared with ``hash mod N``
plus "the next one":

- when a broker is down, its devices spread evenly over all the others (with ``mod N`` and
  "next", all of them would land on one neighbour, doubling its load);
- growing the list from N to N+1 brokers moves only ~1/(N+1) of the devices (``mod N``
  moves almost all of them).

A broker is named by its index in the list, not by its address: moving a broker to another
host keeps its devices. blake2b, not ``hash()``: the same on every process and version.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

from schemas.errors import SettingsError
from schemas.settings import parse_address


@dataclass(frozen=True, slots=True)
class Broker:
    """One broker's address (``tls``: verified against the fleet CA)."""

    host: str
    port: int
    tls: bool = False

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def _score(index: int, device_id: str) -> int:
    digest = hashlib.blake2b(f"{index}/{device_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def failover_order(device_id: str, n: int) -> list[int]:
    """The indices of ``n`` brokers in the order ``device_id`` tries them: home first."""
    if n < 1:
        raise ValueError("at least one broker")
    if n == 1:
        return [0]
    return sorted(range(n), key=lambda i: (-_score(i, device_id), i))


def home_index(device_id: str, n: int) -> int:
    """The index of ``device_id``'s home broker among ``n``."""
    if n == 1:
        return 0
    return max(range(n), key=lambda i: (_score(i, device_id), -i))


def broker_for(device_id: str, brokers: Sequence[Broker]) -> list[Broker]:
    """``brokers`` in ``device_id``'s order: its home broker, then where it fails over."""
    return [brokers[i] for i in failover_order(device_id, len(brokers))]


def parse_brokers(items: Sequence[str], field: str = "mqtt_brokers") -> tuple[Broker, ...]:
    """``host:port`` (or ``mqtt://``/``mqtts://host:port``) items as ``Broker``s; a bad
    or repeated one is a ``SettingsError`` naming ``field``."""
    out: list[Broker] = []
    for raw in items:
        item = raw.strip()
        if not item:
            continue
        tls = item.lower().startswith("mqtts://")
        try:
            host, port = parse_address("mqtt://" + item.split("://", 1)[1] if "://" in item
                                       else item, 8883 if tls else 1883, "MQTT")  # fmt: skip
        except ValueError as exc:
            raise SettingsError(field, str(exc)) from None
        b = Broker(host, port, tls)
        if any(o.address == b.address for o in out):
            raise SettingsError(field, f"{b.address} is listed twice")
        out.append(b)
    return tuple(out)


__all__ = ["Broker", "broker_for", "failover_order", "home_index", "parse_brokers"]
