"""The simulation harness shared by ``fedfleet demo`` and ``fedfleet loadtest``.

Simulated devices running the real ``edge_agent`` code (``fleet``, ``hetero``, ``pool``,
``worker``; the aiomqtt fix the worker applies is ``edge_agent.mqtt_patch``), the service
processes on a running stack (``services``, ``load_services``) and the model monitor
(``monitor``).
"""
