"""The fedfleet edge agent: the program installed on a device (see docs/edge_agent.md).

Main entry points: ``edge_agent.agent.EdgeAgent``, ``edge_agent.settings.AgentSettings``,
``edge_agent.probe.{LinuxProbe, SimulatedProbe}``, ``edge_agent.trainers.NumpyTrainer``
(``edge_agent.torch_trainer.TorchTrainer`` with the ``torch`` extra),
``edge_agent.data``, ``edge_agent.cli.main``. Submodules are imported explicitly so that
light users (``edge_agent.data``) do not pay for MQTT/HTTP/onnxruntime imports.
"""
