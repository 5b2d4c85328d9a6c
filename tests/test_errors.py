"""The one classification of how a call ended (`gmesh.errors.outcome_of`), without I/O."""

from __future__ import annotations

import asyncio
import time

import grpc

from gmesh.errors import CallError, Origin, UpstreamError, outcome_of


def test_a_cancellation_before_the_deadline_is_nobodys_failure() -> None:
    outcome = outcome_of(asyncio.CancelledError(), deadline=time.monotonic() + 10)
    assert (outcome.code, outcome.failed, outcome.endpoint_fault) == (grpc.StatusCode.CANCELLED, False, False)
    assert outcome_of(asyncio.CancelledError()).code is grpc.StatusCode.CANCELLED


def test_a_cancellation_once_the_deadline_passed_is_the_deadline_running_out() -> None:
    outcome = outcome_of(asyncio.CancelledError(), deadline=time.monotonic() - 0.001)
    assert (outcome.code, outcome.failed, outcome.endpoint_fault) == (
        grpc.StatusCode.DEADLINE_EXCEEDED,
        True,
        False,
    )


def test_statuses_keep_their_codes_and_blame() -> None:
    sent = outcome_of(UpstreamError(grpc.StatusCode.UNAVAILABLE, "down", ()))
    assert (sent.code, sent.failed, sent.endpoint_fault) == (grpc.StatusCode.UNAVAILABLE, True, True)
    refused = outcome_of(CallError(grpc.StatusCode.UNAVAILABLE, "no endpoints"))
    assert (refused.failed, refused.endpoint_fault) == (True, False)
    aged = outcome_of(CallError(grpc.StatusCode.UNAVAILABLE, "max age", origin=Origin.DELIBERATE))
    assert not aged.failed
    assert outcome_of(None).ok and not outcome_of(CallError(grpc.StatusCode.NOT_FOUND, "x")).failed
