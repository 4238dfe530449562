"""Errors that fedcare reports to people and, in a safe form, across the wire.

Two audiences, two rules:

* A person at the hospital or coordinator gets a precise message naming the file, row
  and column (``DataError``). It stays on the machine that raised it.
* A message that crosses the network carries only a numeric code and a generic reason
  written by fedcare itself (``WireError``): never exception text, which could quote a
  patient's value.
"""

from __future__ import annotations

from dataclasses import dataclass


class FedcareError(Exception):
    """Base class: an error fedcare explains to its user (CLI exits non-zero)."""

    exit_code = 2


class ConfigError(FedcareError):
    """A run, node or command-line setting is unknown or has the wrong type."""


class DataError(FedcareError):
    """A site's data file failed validation; the message names file, row and column."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row: int | None = None,
        column: str | None = None,
    ) -> None:
        self.path, self.row, self.column = path, row, column
        where = []
        if path is not None:
            where.append(f"file {path}")
        if row is not None:
            where.append(f"row {row}")
        if column is not None:
            where.append(f"column '{column}'")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {message}" if prefix else message)


class BudgetExceeded(FedcareError):
    """Training would spend more privacy budget than the hospital allows."""


class ReleaseRefused(FedcareError):
    """An exact aggregate release would cover records that differ from an earlier
    release's by fewer than the site's ``min-records``: their difference would single
    those records out."""


class FederationError(FedcareError):
    """The federation cannot go on: too few sites connected or answered (their refusals
    were reported as they came)."""

    exit_code = 1


# Codes carried in flwr Error replies. Reasons are fixed strings: no data values.
@dataclass(frozen=True)
class WireError:
    code: int
    reason: str


BUDGET_REFUSED = 4101
DATA_INVALID = 4102
CONFIG_REJECTED = 4103
LEDGER_INVALID = 4104
RELEASE_REFUSED = 4105
INTERNAL_ERROR = 4199

WIRE_REASONS = {
    BUDGET_REFUSED: "privacy budget: the site refuses training that would exceed its (epsilon, delta)",
    DATA_INVALID: "site data failed validation; details are in the site's local log",
    CONFIG_REJECTED: "run configuration rejected by the site",
    LEDGER_INVALID: "privacy ledger failed verification at the site; training refused until resolved",
    RELEASE_REFUSED: "aggregate release refused: the site's records differ from an earlier release's by "
                     "fewer than its min-records",
    INTERNAL_ERROR: "internal error at the site; details are in the site's local log",
}
