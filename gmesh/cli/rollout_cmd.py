"""`gmesh rollout`: blue-green switches and progressive canary rollouts of a service's subsets."""

from __future__ import annotations

import time

import click

from gmesh.cli.common import DURATION, MeshTarget, mesh_options, run, table
from gmesh.config.types import format_duration, parse_duration
from gmesh.errors import InvalidArgument
from gmesh.pluginmanager import Plugins
from gmesh.rollout import controller as rc


@click.group()
def rollout() -> None:
    """Move traffic between subsets of a service: switch at once, or canary step by step.

    Both change the weights of the service's default route rule (the last rule of its
    Route, matching every call; created when missing). Subsets come from the Service kind.
    """


@rollout.command()
@click.argument("service")
@click.option("--to", "to", required=True, metavar="SUBSET", help="the subset that gets all traffic")
@mesh_options
def switch(target: MeshTarget, service: str, to: str) -> None:
    """Blue-green: send all of SERVICE's traffic to subset --to, atomically (one etcd write)."""

    async def go() -> None:
        async with target.store() as store:
            revision = await rc.switch(store, target.keys, Plugins.load().config_kinds(), service, to)
        click.echo(f"{service}: all traffic to {to} (revision {revision})")

    run(go())


def _latency(text: str | None) -> tuple[float | None, bool]:
    if text is None:
        return None, True
    relative = text.startswith("+")
    return parse_duration(text[1:] if relative else text), relative


def _rate(text: str) -> float:
    value = text.strip()
    try:
        return float(value[:-1]) / 100 if value.endswith("%") else float(value)
    except ValueError:
        raise InvalidArgument(f"--max-error-rate {text!r}: write a percentage like 1% or 0.5%") from None


@rollout.command()
@click.argument("service")
@click.option("--to", "to", required=True, metavar="SUBSET", help="the canary subset")
@click.option(
    "--from", "from_", metavar="SUBSET", help="the baseline subset [default: the one with most traffic]"
)
@click.option("--steps", default="5,25,50,100", show_default=True, help="canary percentages, ending at 100")
@click.option("--interval", type=DURATION, default="30s", show_default=True, help="time at each step")
@click.option(
    "--max-error-rate", default="1%", show_default=True, help="roll back above this canary error rate"
)
@click.option(
    "--max-latency-p99", metavar="[+]DURATION",
    help="roll back above this canary p99: +50ms = baseline's p99 + 50 ms; 300ms = absolute",
)  # fmt: skip
@click.option(
    "--min-calls", type=click.IntRange(1), default=20, show_default=True,
    help="canary calls a step needs before it is judged (fewer: the step is measured again)",
)  # fmt: skip
@mesh_options
def canary(
    target: MeshTarget, service: str, to: str, from_: str | None, steps: str, interval: float,
    max_error_rate: str, max_latency_p99: str | None, min_calls: int,
) -> None:  # fmt: skip
    """Progressive rollout of subset --to for SERVICE; runs until promoted or rolled back.

    At each step the canary gets that share of traffic for --interval; gmesh then compares
    the canary's server-error rate and p99 latency (counted by every proxy and channel,
    published to etcd) with the thresholds, and advances, or rolls back to 100% baseline.
    The state lives in etcd: one controller at a time holds the service's lock, and a
    controller started after one died resumes at the same step. `gmesh rollout status`
    shows progress; `gmesh rollout abort` rolls back.
    """
    steps_list = rc.parse_steps(steps)
    latency, relative = _latency(max_latency_p99)
    thresholds = rc.Thresholds(_rate(max_error_rate), latency, relative, min_calls)

    async def go() -> None:
        kinds = Plugins.load().config_kinds()
        async with target.store() as store:
            existing, _ = await rc.load_state(store, target.keys, service)
            if existing is not None and existing.phase in (rc.RUNNING, rc.ABORT_REQUESTED):
                state = existing
            else:
                _, doc, _ = await rc.route_document(store, target.keys, kinds, service)
                weights = rc.default_weights(doc)
                baseline = from_ or (max(weights, key=lambda k: weights[k]) if weights else "")
                if not baseline:
                    raise InvalidArgument(f"{service}: no subset has traffic now; say which with --from")
                if baseline == to:
                    raise InvalidArgument(f"{to} already takes the traffic of {service}")
                await rc.check_subsets(store, target.keys, service, baseline, to)
                state = rc.RolloutState(service, baseline, to, steps_list, interval, thresholds)
                each = format_duration(interval)
                click.echo(f"canary of {service}: {baseline} -> {to}, steps {steps}, {each} each")
                click.echo(f"thresholds: {thresholds.describe()}")
            final = await rc.run_canary(store, target.keys, kinds, state, say=click.echo)
        if final.phase != rc.PROMOTED:
            raise SystemExit(1)

    run(go())


@rollout.command()
@click.argument("service")
@mesh_options
def status(target: MeshTarget, service: str) -> None:
    """Show SERVICE's rollout: phase, step, weights, last measured rates, history."""

    async def go() -> None:
        async with target.store() as store:
            await rc.check_service(store, target.keys, service)
            state, _ = await rc.load_state(store, target.keys, service)
            _, doc, _ = await rc.route_document(store, target.keys, Plugins.load().config_kinds(), service)
            lock = rc.RolloutLock(store, target.keys, service)
            holder = await lock.holder()
        weights = rc.default_weights(doc)
        spread = ", ".join(f"{k or '(all endpoints)'} {v}%" for k, v in weights.items())
        click.echo(f"service {service}: weights {spread or 'none set (every endpoint takes calls)'}")
        if state is None:
            click.echo("no rollout yet")
            return
        steps = ",".join(map(str, state.steps))
        click.echo(
            f"rollout {state.baseline} -> {state.canary}: {state.phase}, "
            f"step {state.step + 1}/{len(state.steps)} ({state.weight}%), "
            f"steps {steps}, interval {format_duration(state.interval)}"
        )
        if state.reason:
            click.echo(f"reason: {state.reason}")
        click.echo(f"thresholds: {state.thresholds.describe()}")
        click.echo(
            f"controller: {holder or 'none running'}; updated {time.time() - state.updated_at:.0f}s ago"
        )
        rows = []
        for name in ("baseline", "canary"):
            m = state.measured.get(name)
            if m:
                rows.append([name, str(m["calls"]), f"{m['error_rate']:.2%}", f"{m['p99'] * 1000:.1f} ms"])
        if rows:
            click.echo("last step measured:")
            click.echo(table(["BACKEND", "CALLS", "ERRORS", "P99"], rows))
        for line in state.history[-10:]:
            click.echo(f"  {line}")

    run(go())


@rollout.command()
@click.argument("service")
@mesh_options
def abort(target: MeshTarget, service: str) -> None:
    """Stop SERVICE's running rollout and send all traffic back to the baseline."""

    async def go() -> None:
        async with target.store() as store:
            click.echo(await rc.abort(store, target.keys, Plugins.load().config_kinds(), service))

    run(go())
