"""Settings, gate, probes, outbox."""

from __future__ import annotations

import os
import subprocess
import sys
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
    r = LinuxProbe(sysfs=sysfs, proc=proc, dev=tmp_path, metered=True).read()
    assert (r.battery, r.charging, r.network, r.metered) == (42.0, False, "wifi", True)
    (ac / "online").write_text("1\n")
    assert LinuxProbe(sysfs=sysfs, proc=proc).read().charging
    empty = LinuxProbe(sysfs=tmp_path / "none", proc=tmp_path / "none").read()
    assert (empty.battery, empty.charging, empty.network) == (100.0, True, "none")


def _fake_proc_dev(tmp_path: Path, load1: str) -> tuple[Path, Path]:
    proc, dev = tmp_path / "proc", tmp_path / "dev"
    proc.mkdir(exist_ok=True)
    (dev / "pts").mkdir(parents=True, exist_ok=True)
    (proc / "loadavg").write_text(f"{load1} 0.50 0.40 1/123 4567\n")
    return proc, dev


@pytest.mark.parametrize(
    "load1,cpus,idle",
    [("0.20", 1, True), ("0.60", 1, False), ("0.60", 2, True), ("1.01", 2, False)],
)
def test_linux_probe_idle_follows_load_per_cpu(
    tmp_path: Path, load1: str, cpus: int, idle: bool
) -> None:
    proc, dev = _fake_proc_dev(tmp_path, load1)
    probe = LinuxProbe(sysfs=tmp_path / "sys", proc=proc, dev=dev, cpus=cpus, idle_max_load=0.5)
    assert probe.load_per_cpu() == pytest.approx(float(load1) / cpus)
    assert probe.input_idle_s() is None  # no terminal devices: input is not a signal
    assert probe.read().idle is idle


def test_linux_probe_recent_terminal_input_is_not_idle(tmp_path: Path) -> None:
    proc, dev = _fake_proc_dev(tmp_path, "0.00")
    for name in ("tty1", "pts/0", "pts/ptmx"):
        (dev / name).write_text("")
    now = 1_000_000.0
    os.utime(dev / "tty1", (now - 3600, now - 3600))
    os.utime(dev / "pts/0", (now - 30, now - 30))  # someone typed 30 s ago
    os.utime(dev / "pts/ptmx", (now, now))  # the multiplexer is not a terminal: ignored
    clock = Clock()
    clock.t = now

    def probe(input_s: float) -> LinuxProbe:
        return LinuxProbe(proc=proc, dev=dev, cpus=1, idle_input_s=input_s, clock=clock)

    assert probe(300).input_idle_s() == pytest.approx(30)
    assert not probe(300).read().idle
    assert probe(10).read().idle
    assert probe(0).read().idle  # 0 disables the input signal
    clock.t = now + 600
    assert probe(300).read().idle


def test_linux_probe_without_loadavg_reads_idle(tmp_path: Path) -> None:
    probe = LinuxProbe(sysfs=tmp_path, proc=tmp_path, dev=tmp_path, cpus=4)
    assert probe.load_per_cpu() is None and probe.read().idle


def test_idle_thresholds_come_from_settings() -> None:
    env = {"FEDFLEET_AGENT_IDLE_MAX_LOAD": "0.8"}
    s = AgentSettings.load({"device_id": "d", "idle_input_s": "0"}, env=env)
    assert (s.idle_max_load, s.idle_input_s) == (0.8, 0.0)
    with pytest.raises(SettingsError):
        AgentSettings.load({"device_id": "d", "idle_max_load": "-1"}, env={})


@pytest.mark.parametrize("name", ["crash_at", "simulate_compute", "gate_check_s"])
def test_test_and_simulation_switches_are_not_settings(name: str) -> None:
    # crash points and simulated compute are injected collaborators (CrashPoints,
    # ComputePacer), never settings: a value is refused, an env var means nothing
    with pytest.raises(SettingsError) as err:
        AgentSettings.load({"device_id": "d", name: "1"}, env={})
    assert name in str(err.value)
    s = AgentSettings.load({"device_id": "d"}, env={f"FEDFLEET_AGENT_{name.upper()}": "1"})
    assert not hasattr(s, name)


def test_trainer_is_chosen_by_flag_and_validated() -> None:
    from edge_agent.cli import build_parser, settings_from

    ns = build_parser().parse_args(["--device-id", "d", "--trainer", "torch"])
    assert settings_from(ns).trainer == "torch"
    assert AgentSettings(device_id="d").trainer == "numpy"
    with pytest.raises(SettingsError):
        AgentSettings.load({"device_id": "d", "trainer": "jax"}, env={})


def test_build_agent_injects_simulated_compute_only_for_a_simulated_probe(
    tmp_path: Path,
) -> None:
    from edge_agent.cli import build_agent
    from edge_agent.crash import CrashPoints
    from edge_agent.errors import AgentError
    from edge_agent.pacing import RealCompute, SimulatedCompute

    data = tmp_path / "d.npz"
    np.savez(data, x=np.zeros((4, 3), np.float32), y=np.array([0, 1, 0, 1]))
    s = AgentSettings(device_id="d", data_path=data)
    sim = build_agent(s, probe_kind="simulated")
    assert isinstance(sim.pacer, SimulatedCompute) and sim.pacer.probe is sim.probe
    assert isinstance(sim.probe, SimulatedProbe) and sim.crash.at == ""
    crash = CrashPoints("before_publish")
    real = build_agent(s, crash=crash)
    assert isinstance(real.probe, LinuxProbe) and isinstance(real.pacer, RealCompute)
    assert real.crash is crash and len(real.dataset) == 4
    with pytest.raises(AgentError):
        build_agent(AgentSettings(device_id="d"))  # no data


def test_crashing_agent_refuses_a_missing_or_unknown_point(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from tests.crashing_agent import main

    assert main([]) == 2 and "usage" in capsys.readouterr().err
    assert main(["nowhere", "--device-id", "d"]) == 2
    assert "crash_point: unknown crash point 'nowhere'" in capsys.readouterr().err


def test_crash_point_kills_the_process_only_at_its_point() -> None:
    code = (
        "from edge_agent.crash import CrashPoints\n"
        "c = CrashPoints('after_outbox')\n"
        "CrashPoints().hit('after_outbox')\n"
        "c.hit('before_publish')\n"
        "print('alive', flush=True)\n"
        "c.hit('after_outbox')\n"
        "print('not reached')\n"
    )
    root = Path(__file__).resolve().parents[1]
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=60
    )
    assert p.stdout.splitlines() == ["alive", "fedfleet-agent: crash point after_outbox"]
    assert p.returncode == -9


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
