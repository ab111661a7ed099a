"""The local broker stack (Kafka, MQTT, Redis) for demos, tests and development."""

from stack.launcher import LocalStack, StackInfo, StackSettings

__all__ = ["LocalStack", "StackInfo", "StackSettings"]
