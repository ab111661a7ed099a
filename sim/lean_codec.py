"""A minimal MQTT 3.1.1 packet codec for the lean devices (``sim.lean``), no I/O.

Only what a device session needs: CONNECT (client id, clean-session flag, keep-alive,
will, username/password), CONNACK, SUBSCRIBE/SUBACK, PUBLISH (QoS 0/1, retain, dup),
PUBACK, PINGREQ/PINGRESP and DISCONNECT, as the OASIS MQTT 3.1.1 standard lays them out
(section 2: fixed header with the "remaining length" varint; section 3: each packet).
MQTT 3.1.1 because it is what the real agent speaks (``edge_agent.mqtt_link``: aiomqtt's
default protocol). ``PacketReader`` cuts a byte stream into ``(type, flags, body)``; the
``decode_*`` functions read bodies; anything malformed is a ``MqttProtocolError``.
Tested against the real Mosquitto in tests/test_lean_device.py.

Why a codec of our own: the project's MQTT client is aiomqtt over paho, which costs
~90 µs of CPU per device-second in the simulator (BENCHMARKS.md, "scale"): per client a
paho object with its own buffers, locks, housekeeping and callbacks. The other asyncio
clients on PyPI (gmqtt, amqtt) would be a new dependency and still keep tasks, timers and
futures per client and per message; a device that only sends telemetry needs none of
that. This module is about 150 lines; the session logic around it is ``sim.lean``.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14
PROTOCOL_LEVEL = 4  # MQTT 3.1.1
MAX_PACKET = 1 << 20  # a device never receives more (DEFAULT_MAX_BYTES of the schemas)
PINGREQ_PACKET = b"\xc0\x00"
DISCONNECT_PACKET = b"\xe0\x00"
_U16 = struct.Struct(">H")


class MqttProtocolError(ValueError):
    """A packet that is not MQTT 3.1.1 as this codec knows it (the session is dropped)."""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _str(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    if len(b) > 0xFFFF:
        raise MqttProtocolError("string longer than 65,535 bytes")
    return _U16.pack(len(b)) + b


def _packet(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def connect(
    client_id: str, *, keepalive: int, clean_session: bool, username: str = "",
    password: str = "", will: tuple[str, bytes, int, bool] | None = None,
) -> bytes:  # fmt: skip
    """CONNECT; ``will`` is ``(topic, payload, qos, retain)``."""
    flags = 0x02 if clean_session else 0x00
    payload = _str(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += _str(topic) + _str(message)
    if username:
        flags |= 0x80
        payload += _str(username)
    if password:
        flags |= 0x40
        payload += _str(password)
    head = _str("MQTT") + bytes((PROTOCOL_LEVEL, flags)) + _U16.pack(keepalive)
    return _packet(CONNECT << 4, head + payload)


def subscribe(packet_id: int, filters: Iterable[tuple[str, int]]) -> bytes:
    body = _U16.pack(packet_id) + b"".join(_str(f) + bytes((q,)) for f, q in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def publish(
    topic: bytes, payload: bytes, qos: int = 0, *, packet_id: int = 0, retain: bool = False,
    dup: bool = False,
) -> bytes:  # fmt: skip
    """PUBLISH; ``topic`` already UTF-8 (a device's topics are built once)."""
    first = (PUBLISH << 4) | (qos << 1) | (0x01 if retain else 0) | (0x08 if dup else 0)
    head = _U16.pack(len(topic)) + topic
    if qos:
        head += _U16.pack(packet_id)
    return _packet(first, head + payload)


def puback(packet_id: int) -> bytes:
    return b"\x40\x02" + _U16.pack(packet_id)


class PacketReader:
    """Cuts a byte stream into ``(type, flags, body)`` packets; keeps a partial tail."""

    __slots__ = ("_buf",)

    def __init__(self) -> None:
        self._buf = b""

    def feed(self, data: bytes) -> list[tuple[int, int, bytes]]:
        buf = self._buf + data if self._buf else data
        out: list[tuple[int, int, bytes]] = []
        pos, end = 0, len(buf)
        while end - pos >= 2:
            first = buf[pos]
            n, mult, i = 0, 1, pos + 1
            while True:
                if i >= end:
                    self._buf = buf[pos:]
                    return out
                digit = buf[i]
                n += (digit & 0x7F) * mult
                i += 1
                if not digit & 0x80:
                    break
                mult *= 128
                if mult > 128**3:
                    raise MqttProtocolError("remaining length longer than 4 bytes")
            if n > MAX_PACKET:
                raise MqttProtocolError(f"packet of {n} bytes > {MAX_PACKET}")
            if end - i < n:
                break
            out.append((first >> 4, first & 0x0F, buf[i : i + n]))
            pos = i + n
        self._buf = buf[pos:] if pos < end else b""
        return out


def decode_connack(body: bytes) -> tuple[bool, int]:
    """``(session_present, return_code)``; 0 is accepted, 4/5 a refused credential."""
    if len(body) != 2:
        raise MqttProtocolError(f"CONNACK of {len(body)} bytes")
    return bool(body[0] & 0x01), body[1]


def decode_packet_id(body: bytes) -> int:
    """The packet id of a PUBACK (and the first field of a SUBACK)."""
    if len(body) < 2:
        raise MqttProtocolError("packet id missing")
    return int(_U16.unpack_from(body)[0])


def decode_suback(body: bytes) -> tuple[int, bytes]:
    """``(packet_id, return codes)``; a code 0x80 is a refused subscription."""
    if len(body) < 3:
        raise MqttProtocolError("SUBACK without return codes")
    return decode_packet_id(body), body[2:]


def decode_publish(flags: int, body: bytes) -> tuple[str, int, int, bool, bytes]:
    """``(topic, qos, packet_id, retain, payload)`` of a PUBLISH."""
    qos = (flags >> 1) & 0x03
    if qos > 2 or len(body) < 2:
        raise MqttProtocolError("bad PUBLISH header")
    n = _U16.unpack_from(body)[0]
    at = 2 + n
    if len(body) < at + (2 if qos else 0):
        raise MqttProtocolError("PUBLISH shorter than its topic")
    try:
        topic = body[2:at].decode()
    except UnicodeDecodeError:
        raise MqttProtocolError("PUBLISH topic is not UTF-8") from None
    packet_id = 0
    if qos:
        packet_id = _U16.unpack_from(body, at)[0]
        at += 2
    return topic, qos, packet_id, bool(flags & 0x01), body[at:]
