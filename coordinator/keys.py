"""Every Redis key the coordinator writes, named in one place.

``p`` is ``CoordinatorSettings.key_prefix`` (``ff:{topic_prefix}`` unless ``redis_prefix``
is set). A job's own keys carry the job id as a Redis Cluster hash tag (``{job}``), so
the keys of one job that a script touches together (``leases``, ``round``, ``jobstats``)
hash to one slot::

    key                     type    written by           what
    {p}dev:{id}             hash    FleetStore           device detail (telemetry, state, times)
    {p}selt                 hash    FleetStore           device -> packed telemetry (selection)
    {p}sels                 hash    FleetStore, confirm  device -> packed task state
    {p}seen                 zset    FleetStore           online device -> last seen
    {p}lastseen             zset    FleetStore           every device -> last seen
    {p}contrib              zset    FleetStore, confirm  device -> contributions + fraction
    {p}hist:{id}            list    FleetStore, confirm  last task outcomes of a device
    {p}job:{{job}}          hash    JobStore             spec, eligibility, selection, status
    {p}jobs                 zset    JobStore             job id -> created_ts
    {p}task:{task}          hash    TaskStore            task record (state, token sha, ...)
    {p}leases:{{job}}       zset    TaskStore            active task -> deadline
    {p}round:{{job}}        hash    RoundStore, claim    the sync round (``taken`` by claims)
    {p}jobstats:{{job}}     hash    JobStatsStore (+ the task scripts' counters)
    {p}holds:{{job}}        zset    FleetStore           device held off the job -> until
    {p}sideleases:{{job}}   zset    TaskStore            active eval/stats task -> deadline
    {p}evals:{{job}}        zset    EvalStore            evaluated version -> version
    {p}eval:{{job}}:{v}     hash    EvalStore, report    sums of the evaluation of version v
    {p}evaldev:{{job}}:{v}  set     EvalStore, report    devices that reported for version v
    {p}ending               set     JobStore             ended jobs whose side tasks, open
                                                         evaluations or final evaluation
                                                         the selector still sweeps
    {p}fedstats:{{job}}     hash    StatsStore, report   sums of the statistics phase
    {p}fedstatsdev:{{job}}  set     StatsStore, report   devices that reported statistics
    {p}selector-lock        string  RedisLock            one selector pass at a time
    {p}enroltok:{{enrol}}:{sha}  hash  EnrolmentStore  an enrolment token (by its sha256):
                                                         expiry, bound device, used_ts/used_by
    {p}cred:{{enrol}}:{id}  hash    EnrolmentStore       a device credential: secret sha256,
                                                         enrolled_ts, revoked_ts, journal revision
    {p}enrolled:{{enrol}}   set     EnrolmentStore       device ids holding a valid credential
    {p}credchecks:{{enrol}} string  EnrolmentStore       credential checks against the journal

(``{{job}}`` is the job id inside literal braces, e.g. ``ff:fl.round:{job-1a2b}``;
``{{enrol}}`` is the literal ``{enrol}``: every enrolment key hashes to one slot, so the
enrolment scripts run on a Redis Cluster too.)

The upload confirm script (``TaskStore.confirm_upload``) and the telemetry script touch a
task or device key next to job or fleet-wide keys; they run on a single Redis (or one
primary), not across Cluster slots.
"""

from __future__ import annotations


class Keys:
    """Key names under one prefix. Pure: no I/O."""

    __slots__ = ("p",)

    def __init__(self, prefix: str) -> None:
        self.p = prefix

    # fleet
    def device(self, device_id: str) -> str:
        return f"{self.p}dev:{device_id}"

    @property
    def device_prefix(self) -> str:
        """``device(id) == device_prefix + id`` (the telemetry script builds keys so)."""
        return f"{self.p}dev:"

    @property
    def selt(self) -> str:
        return f"{self.p}selt"

    @property
    def sels(self) -> str:
        return f"{self.p}sels"

    @property
    def seen(self) -> str:
        return f"{self.p}seen"

    @property
    def lastseen(self) -> str:
        return f"{self.p}lastseen"

    @property
    def contrib(self) -> str:
        return f"{self.p}contrib"

    def history(self, device_id: str) -> str:
        return f"{self.p}hist:{device_id}"

    # jobs, tasks, rounds, stats
    def job(self, job_id: str) -> str:
        return f"{self.p}job:{{{job_id}}}"

    @property
    def jobs(self) -> str:
        return f"{self.p}jobs"

    def task(self, task_id: str) -> str:
        return f"{self.p}task:{task_id}"

    @property
    def task_pattern(self) -> str:
        """SCAN pattern matching every task record."""
        return f"{self.p}task:*"

    def leases(self, job_id: str) -> str:
        return f"{self.p}leases:{{{job_id}}}"

    def round(self, job_id: str) -> str:
        return f"{self.p}round:{{{job_id}}}"

    def jobstats(self, job_id: str) -> str:
        return f"{self.p}jobstats:{{{job_id}}}"

    def holds(self, job_id: str) -> str:
        return f"{self.p}holds:{{{job_id}}}"

    def side_leases(self, job_id: str) -> str:
        """Active ``eval``/``stats`` tasks (they take no training slot)."""
        return f"{self.p}sideleases:{{{job_id}}}"

    def evals(self, job_id: str) -> str:
        return f"{self.p}evals:{{{job_id}}}"

    def evaluation(self, job_id: str, version: int) -> str:
        return f"{self.p}eval:{{{job_id}}}:{version}"

    def eval_devices(self, job_id: str, version: int) -> str:
        return f"{self.p}evaldev:{{{job_id}}}:{version}"

    @property
    def ending(self) -> str:
        return f"{self.p}ending"

    def fedstats(self, job_id: str) -> str:
        return f"{self.p}fedstats:{{{job_id}}}"

    def fedstats_devices(self, job_id: str) -> str:
        return f"{self.p}fedstatsdev:{{{job_id}}}"

    @property
    def selector_lock(self) -> str:
        return f"{self.p}selector-lock"

    # enrolment (one hash slot: ``{enrol}``)
    def enrol_token(self, sha: str) -> str:
        return f"{self.p}enroltok:{{enrol}}:{sha}"

    def credential(self, device_id: str) -> str:
        return f"{self.p}cred:{{enrol}}:{device_id}"

    @property
    def enrolled(self) -> str:
        return f"{self.p}enrolled:{{enrol}}"

    @property
    def cred_checks(self) -> str:
        """Counts credential checks against the journal (a wipe or rollback sets it back)."""
        return f"{self.p}credchecks:{{enrol}}"
