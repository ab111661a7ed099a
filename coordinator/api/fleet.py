"""The fleet summary and the devices."""

from __future__ import annotations

import time
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Query

from coordinator.api.common import R401, R404, R422, fleet_reader
from coordinator.api.state import AppState, app_state
from coordinator.errors import NotFound
from coordinator.fleet import device_json, device_state, fleet_summary
from coordinator.policy import EligibilityPolicy

router = APIRouter(tags=["fleet"])
State = Annotated[AppState, Depends(app_state)]


@router.get("/v1/fleet", dependencies=[Depends(fleet_reader)], responses=R401)
async def fleet(state: State) -> dict[str, Any]:
    now = time.time()
    views = await state.fleet.all_views(now)
    running = await state.jobs.running()
    policy = running[0].eligibility if running else EligibilityPolicy()
    out = fleet_summary(views, len(views), policy, now)
    accepted = 0
    for j in await state.jobs.ids():
        accepted += (await state.stats.stats(j)).get("updates_accepted", 0)
    out["updates_accepted"] = accepted
    return out


@router.get("/v1/devices", dependencies=[Depends(fleet_reader)], responses={**R401, **R422})
async def devices(
    state: State,
    state_: Annotated[str | None, Query(alias="state", pattern="^(offline|idle|training)$")] = None,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict[str, Any]:
    ids = await state.fleet.all_ids()
    if state_ is None:
        views = await state.fleet.views(ids[offset : offset + limit])
        total = len(ids)
    else:
        allv = [v for v in await state.fleet.all_views() if device_state(v) == state_]
        allv.sort(key=lambda v: v.device_id)
        total = len(allv)
        views = allv[offset : offset + limit]
    return {"total": total, "offset": offset, "limit": limit,
            "devices": [device_json(v) for v in views]}  # fmt: skip


@router.get("/v1/devices/{device_id}", dependencies=[Depends(fleet_reader)],
            responses={**R401, **R404, **R422})  # fmt: skip
async def device(state: State, device_id: Annotated[str, Path(max_length=128)]) -> dict[str, Any]:
    d = await state.fleet.get(device_id)
    if d is None:
        raise NotFound("device", device_id)
    return d
