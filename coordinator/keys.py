"""Every Redis key the coordinator writes, named in one place.

``p`` is ``CoordinatorSettings.key_prefix`` (``ff:{topic_prefix}`` unless ``redis_prefix``
is set); every key starts with it (a Redis ACL ``~<p>*`` covers them all). Right after it
comes the deployment's Redis Cluster hash tag ``{t}``, the prefix itself inside literal
braces (``ff:fl.{ff:fl.}dev:d1``): every key below but the enrolment keys hashes to that
one slot, so each multi-key script and ``MULTI`` runs on a Redis Cluster as on a single
Redis, including those that reach across fleet, task and job keys (the telemetry write,
the sweep, the upload confirm, the report fold, ``JobStore.put``)::

    key                     type    written by           what
    {p}{t}dev:{id}          hash    FleetStore           device detail (telemetry, state, times)
    {p}{t}selt              hash    FleetStore           device -> packed telemetry (selection)
    {p}{t}sels              hash    FleetStore, confirm  device -> packed task state
    {p}{t}seen              zset    FleetStore           online device -> last seen
    {p}{t}lastseen          zset    FleetStore           every device -> last seen
    {p}{t}contrib           zset    FleetStore, confirm  device -> contributions + fraction
    {p}{t}hist:{id}         list    FleetStore, confirm  last task outcomes of a device
    {p}{t}job:{job}         hash    JobStore             spec, eligibility, selection, status
    {p}{t}jobs              zset    JobStore             job id -> created_ts
    {p}{t}task:{task}       hash    TaskStore            task record (state, token sha, ...)
    {p}{t}leases:{job}      zset    TaskStore            active task -> deadline
    {p}{t}round:{job}       hash    RoundStore, claim    the sync round (``taken`` by claims)
    {p}{t}jobstats:{job}    hash    JobStatsStore (+ the task scripts' counters)
    {p}{t}holds:{job}       zset    FleetStore           device held off the job -> until
    {p}{t}sideleases:{job}  zset    TaskStore            active eval/stats task -> deadline
    {p}{t}evals:{job}       zset    EvalStore            evaluated version -> version
    {p}{t}eval:{job}:{v}    hash    EvalStore, report    sums of the evaluation of version v
    {p}{t}evaldev:{job}:{v} set     EvalStore, report    devices that reported for version v
    {p}{t}ending            set     JobStore             ended jobs whose side tasks, open
                                                         evaluations or final evaluation
                                                         the selector still sweeps
    {p}{t}fedstats:{job}    hash    StatsStore, report   sums of the statistics phase
    {p}{t}fedstatsdev:{job} set     StatsStore, report   devices that reported statistics
    {p}{t}selector-lock     string  RedisLock            one selector pass at a time
    {p}enroltok:{{enrol}}:{sha}  hash  EnrolmentStore  an enrolment token (by its sha256):
                                                         expiry, bound device, used_ts/used_by
    {p}cred:{{enrol}}:{id}  hash    EnrolmentStore       a device credential: secret sha256,
                                                         enrolled_ts, revoked_ts, journal revision
    {p}enrolled:{{enrol}}   set     EnrolmentStore       device ids holding a valid credential
    {p}credchecks:{{enrol}} string  EnrolmentStore       credential checks against the journal

(``{t}`` is the literal ``{<p>}``, e.g. ``{ff:fl.}``; ``{{enrol}}`` is the literal
``{enrol}``: the enrolment keys hash to a slot of their own, and no script touches them
together with the others. A prefix may not contain braces: it would move the tag.)

Capacity on a Redis Cluster: one deployment is one slot, so one primary holds and serves
all of its working state (other deployments sharing the cluster, by their prefixes, land
on other slots; replicas add failover, not write capacity). That is the price of the
cross-key atomic steps above, and it is affordable: a device costs about 1.3 KiB (its
``dev`` hash, one ``hist`` entry and its fields in the fleet indexes; measured on 20,000
devices, a full history adds about 1 KiB), so a million devices fit one primary's
memory, and the telemetry path is one script per batch (500 devices by default).
Spreading one fleet over the primaries would take, at least: task ids that carry their
job's slot (a ``{job}`` tag of their own for task, lease, round and job-stats keys; a
``TaskResponse`` names only its task), the fleet indexes (``selt``, ``sels``, ``seen``,
``lastseen``, ``contrib``) cut into per-shard copies under a device-hash tag with
``FleetStore.candidates`` merging the shards' ``contrib`` pages by score, the upload
confirm split into a job step and an idempotent device step (keyed by the device's
history), and the sweep reading task states before a re-checking removal script.
"""

from __future__ import annotations


def slot_tag(prefix: str) -> str:
    """The deployment's hash tag: ``{<prefix>}`` (pure)."""
    if "{" in prefix or "}" in prefix:
        raise ValueError(f"a Redis key prefix may not contain braces: {prefix!r}")
    return "{" + (prefix or "ff:") + "}"


class Keys:
    """Key names under one prefix. Pure: no I/O."""

    __slots__ = ("head", "p")

    def __init__(self, prefix: str) -> None:
        self.p = prefix
        self.head = prefix + slot_tag(prefix)  # every key in the deployment's slot starts so

    # fleet
    def device(self, device_id: str) -> str:
        return f"{self.head}dev:{device_id}"

    @property
    def device_prefix(self) -> str:
        """``device(id) == device_prefix + id`` (the sweep script builds keys so)."""
        return f"{self.head}dev:"

    @property
    def selt(self) -> str:
        return f"{self.head}selt"

    @property
    def sels(self) -> str:
        return f"{self.head}sels"

    @property
    def seen(self) -> str:
        return f"{self.head}seen"

    @property
    def lastseen(self) -> str:
        return f"{self.head}lastseen"

    @property
    def contrib(self) -> str:
        return f"{self.head}contrib"

    def history(self, device_id: str) -> str:
        return f"{self.head}hist:{device_id}"

    # jobs, tasks, rounds, stats
    def job(self, job_id: str) -> str:
        return f"{self.head}job:{job_id}"

    @property
    def jobs(self) -> str:
        return f"{self.head}jobs"

    def task(self, task_id: str) -> str:
        return f"{self.head}task:{task_id}"

    @property
    def task_pattern(self) -> str:
        """SCAN pattern matching every task record (on a cluster: scan every primary)."""
        return f"{self.head}task:*"

    def leases(self, job_id: str) -> str:
        return f"{self.head}leases:{job_id}"

    def round(self, job_id: str) -> str:
        return f"{self.head}round:{job_id}"

    def jobstats(self, job_id: str) -> str:
        return f"{self.head}jobstats:{job_id}"

    def holds(self, job_id: str) -> str:
        return f"{self.head}holds:{job_id}"

    def side_leases(self, job_id: str) -> str:
        """Active ``eval``/``stats`` tasks (they take no training slot)."""
        return f"{self.head}sideleases:{job_id}"

    def evals(self, job_id: str) -> str:
        return f"{self.head}evals:{job_id}"

    def evaluation(self, job_id: str, version: int) -> str:
        return f"{self.head}eval:{job_id}:{version}"

    def eval_devices(self, job_id: str, version: int) -> str:
        return f"{self.head}evaldev:{job_id}:{version}"

    @property
    def ending(self) -> str:
        return f"{self.head}ending"

    def fedstats(self, job_id: str) -> str:
        return f"{self.head}fedstats:{job_id}"

    def fedstats_devices(self, job_id: str) -> str:
        return f"{self.head}fedstatsdev:{job_id}"

    @property
    def selector_lock(self) -> str:
        return f"{self.head}selector-lock"

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
