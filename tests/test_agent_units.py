"""Settings, gate, probes, outbox."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import SettingsError
from edge_agent.gate import abort_reason, gate_reason
from edge_agent.outbox import FileOutbox, MemoryOutbox
from edge_agent.probe import DeviceProbe, LinuxProbe, ProbeReading, SimulatedProbe
from edge_agent.settings import AgentSettings

# ----------------------------------------------------------------------------- settings


def test_settings_precedence_flags_over_env_over_file(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.toml"
    cfg.write_text('[agent]\ndevice_id = "file"\nmqtt_port = 1000\napi_url = "http://f"\n')
    env = {"FEDFLEET_AGENT_MQTT_PORT": "2000", "FEDFLEET_AGENT_METERED": "true"}
    s = AgentSettings.load({"api_url": "http://flag", "mqtt_host": None}, env=env, config_file=cfg)
    assert (s.device_id, s.mqtt_port, s.api_url, s.metered) == ("file", 2000, "http://flag", True)
    assert s.mqtt_host == "127.0.0.1" and not s.durable


@pytest.mark.parametrize(
    "values",
    [
        {},
        {"device_id": "d", "mqtt_port": "x"},
        {"device_id": "d", "nope": 1},
        {"device_id": "d", "outbox": "file"},
    ],
)
def test_bad_settings_raise_settings_error(values: dict[str, object]) -> None:
    with pytest.raises(SettingsError):
        AgentSettings.load(values, env={})


# ----------------------------------------------------------------------------- gate


@pytest.mark.parametrize(
    "reading,min_battery,allow_metered,reason",
    [
        (ProbeReading(battery=10, charging=True), 20, False, None),
        (ProbeReading(battery=10, charging=False), 20, False, "low_battery"),
        (ProbeReading(battery=50, charging=False), 20, False, None),
        (ProbeReading(network="cellular", metered=True), 20, False, "metered"),
        (ProbeReading(network="cellular", metered=True), 20, True, None),
        (ProbeReading(network="none"), 20, True, "offline"),
    ],
)
def test_gate(reading: ProbeReading, min_battery: float, allow_metered: bool, reason: str) -> None:
    assert gate_reason(reading, min_battery=min_battery, allow_metered=allow_metered) == reason


def test_unplug_below_floor_aborts_as_unplugged() -> None:
    before = ProbeReading(battery=10, charging=True)
    assert abort_reason(before, before, min_battery=20, allow_metered=False) is None
    now = ProbeReading(battery=10, charging=False)
    assert abort_reason(before, now, min_battery=20, allow_metered=False) == "unplugged"


# ----------------------------------------------------------------------------- probes


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


def test_simulated_probe_is_seeded_and_drains_faster_when_training() -> None:
    def make(c: Clock) -> SimulatedProbe:
        return SimulatedProbe(
            seed=5,
            battery=80,
            charging=False,
            network="wifi",
            clock=c,
            time_scale=60.0,
            plug_rate_per_h=0,
            network_change_per_h=0,
        )

    c1, c2 = Clock(), Clock()
    idle, busy = make(c1), make(c2)
    assert isinstance(idle, DeviceProbe) and idle.compute_speed == busy.compute_speed
    busy.set_training(True)
    c1.t = c2.t = 60.0  # one simulated hour
    assert busy.read().battery == pytest.approx(80 - 25) and idle.read().battery == 78
    assert not busy.read().idle


def test_simulated_probe_charges_and_delay_scales_with_speed() -> None:
    c = Clock()
    p = SimulatedProbe(seed=1, battery=50, charging=True, clock=c, unplug_rate_per_h=0)
    c.t = 3600
    assert p.read().battery == 90
    p.set(charging=False)
    assert not p.read().charging
    fast = SimulatedProbe(seed=1, compute_speed=2.0, time_scale=10.0)
    slow = SimulatedProbe(seed=1, compute_speed=0.5, time_scale=10.0)
    assert slow.compute_delay(1000) == pytest.approx(4 * fast.compute_delay(1000))


def test_simulated_fleet_is_heterogeneous() -> None:
    probes = [SimulatedProbe(seed=i) for i in range(50)]
    speeds = {round(p.compute_speed, 3) for p in probes}
    nets = {p.read().network for p in probes}
    assert len(speeds) > 40 and nets == {"wifi", "cellular"}


def test_linux_probe_reads_sysfs(tmp_path: Path) -> None:
    sysfs, proc = tmp_path / "sys", tmp_path / "proc"
    bat = sysfs / "class/power_supply/BAT0"
    ac = sysfs / "class/power_supply/AC"
    bat.mkdir(parents=True)
    ac.mkdir(parents=True)
    (bat / "type").write_text("Battery\n")
    (bat / "capacity").write_text("42\n")
    (bat / "status").write_text("Discharging\n")
    (ac / "type").write_text("Mains\n")
    (ac / "online").write_text("0\n")
    (sysfs / "class/net/wlan0/wireless").mkdir(parents=True)
    (proc / "net").mkdir(parents=True)
    (proc / "net/route").write_text("Iface\tDestination\tGateway\nwlan0\t00000000\t0101A8C0\n")
    r = LinuxProbe(sysfs=sysfs, proc=proc, metered=True).read()
    assert (r.battery, r.charging, r.network, r.metered) == (42.0, False, "wifi", True)
    (ac / "online").write_text("1\n")
    assert LinuxProbe(sysfs=sysfs, proc=proc).read().charging
    empty = LinuxProbe(sysfs=tmp_path / "none", proc=tmp_path / "none").read()
    assert (empty.battery, empty.charging, empty.network) == (100.0, True, "none")


# ----------------------------------------------------------------------------- outbox


def test_file_outbox_survives_restart(tmp_path: Path) -> None:
    ob = FileOutbox(tmp_path)
    ob.put("t:1", b"one")
    ob.put("t-2", b"two")
    ob.save_residual("job:1", np.arange(3, dtype=np.float32))
    (tmp_path / "outbox" / "half.upd.tmp").write_bytes(b"x")
    again = FileOutbox(tmp_path)
    assert sorted(again.pending()) == [("t-2", b"two"), ("t:1", b"one")]
    assert "t:1" in again and again.remove("t:1") and "t:1" not in again
    np.testing.assert_array_equal(again.load_residual("job:1"), [0, 1, 2])
    assert not list((tmp_path / "outbox").glob("*.tmp"))
    again.save_residual("job:1", None)
    assert again.load_residual("job:1") is None
    again.put_task("task:9", b"t")
    assert FileOutbox(tmp_path).pending_tasks() == [("task:9", b"t")]
    again.remove_task("task:9")
    assert FileOutbox(tmp_path).pending_tasks() == []


def test_memory_outbox_same_contract() -> None:
    ob = MemoryOutbox()
    ob.put("a", b"1")
    assert "a" in ob and ob.pending() == [("a", b"1")] and ob.remove("a") and not ob.remove("a")
    assert ob.load_residual("j") is None
