"""Synchronous FedAvg (McMahan et al. 2017) as the baseline: rounds of ``K`` fresh updates.

Only updates trained on the current version are admitted (``wrong_round`` otherwise); after
``K`` of them ``x += server_lr * sum(n_i D_i) / sum(n_i)`` and the version (round) advances.
Round deadlines and over-selection are the coordinator's; it may call :meth:`flush` to close
a short round.
"""

from __future__ import annotations

import numpy as np

from aggregator.errors import UpdateRejected
from aggregator.strategies.base import Update
from aggregator.strategies.fedbuff import FedBuff
from schemas.types import F32


class FedAvg(FedBuff):
    """Sample-weighted synchronous rounds."""

    name = "fedavg"

    def admit(self, update: Update, staleness: int) -> None:
        if staleness != 0:
            raise UpdateRejected(
                "wrong_round", f"base {update.base_version} != round {self.version}"
            )

    def weight(self, update: Update, staleness: int) -> float:
        return float(update.num_samples)

    def _reduce(self) -> F32:
        return self._acc / np.float32(self._weight_sum)
