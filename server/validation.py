"""Every reply is checked before it can touch the global model.

A hospital that is broken or hostile must neither crash the coordinator nor poison the
aggregate. A rejected reply is logged with the site and reason, excluded from the round,
and the run continues.
"""

from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

import numpy as np
from flwr.app import Message

log = logging.getLogger("fedcare.server")

SITE_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")
#: Largest example count a reply may claim (a plausibility bound, not a size limit).
MAX_EXAMPLES = 10_000_000


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str = ""
    #: A train reply's arrays as decoded while checking them, so that aggregation does not
    #: decode every accepted update a second time.
    arrays: dict[str, np.ndarray] | None = None


def site_name(msg: Message) -> str:
    """The site's self-declared name if well-formed, else ``node-<id>``."""
    fallback = f"node-{msg.metadata.src_node_id}"
    try:
        name = msg.content.config_records["site"]["name"]
    except Exception:  # noqa: BLE001 - a malformed record is just an unnamed site
        return fallback
    return name if isinstance(name, str) and SITE_NAME.match(name) else fallback


def check_metrics(msg: Message, required: tuple[str, ...] = ("num-examples",)) -> Verdict:
    """Exactly one MetricRecord ``metrics`` of finite scalars with a plausible count."""
    content = msg.content
    if set(content.metric_records) != {"metrics"}:
        return Verdict(False, f"expected one MetricRecord 'metrics', got {sorted(content.metric_records)}")
    metrics = content.metric_records["metrics"]
    for key in required:
        if key not in metrics:
            return Verdict(False, f"metric '{key}' missing")
    for key, value in metrics.items():
        if isinstance(value, list) or isinstance(value, bool) or not isinstance(value, (int, float)):
            return Verdict(False, f"metric '{key}' is not a scalar number")
        base = key.removeprefix("val_")
        if base != "roc_auc" and not math.isfinite(float(value)) and key not in ("epsilon",):
            if not (isinstance(value, float) and math.isnan(value) and base in _NAN_OK):
                return Verdict(False, f"metric '{key}' is not finite")
    for key in ("num-examples", "num-val"):
        n = metrics.get(key, 1)
        if not float(n).is_integer() or not 0 < n <= MAX_EXAMPLES:
            return Verdict(False, f"implausible {key} {n!r}")
    return Verdict(True)


_NAN_OK = {"roc_auc", "precision", "recall", "f1", "loss"}


def check_train_reply(msg: Message, reference: dict[str, np.ndarray], max_update_norm: float) -> Verdict:
    """Arrays as the global model (names, shapes, dtypes), finite, bounded update."""
    verdict = answered(msg)
    if not verdict.ok:
        return verdict
    content = msg.content
    if set(content.array_records) != {"arrays"}:
        return Verdict(False, f"expected one ArrayRecord 'arrays', got {sorted(content.array_records)}")
    verdict = _check_extra(msg)
    if not verdict.ok:
        return verdict
    record = content.array_records["arrays"]
    keys = set(record.keys())
    if keys != set(reference):
        missing, extra = sorted(set(reference) - keys), sorted(keys - set(reference))
        return Verdict(False, f"array names differ (missing {missing[:3]}, unexpected {extra[:3]})")
    sq = 0.0
    decoded: dict[str, np.ndarray] = {}
    for key, ref in reference.items():
        arr = record[key]
        if tuple(arr.shape) != tuple(ref.shape):
            return Verdict(False, f"array '{key}' has shape {tuple(arr.shape)}, expected {tuple(ref.shape)}")
        if np.dtype(arr.dtype) != ref.dtype:
            return Verdict(False, f"array '{key}' has dtype {arr.dtype}, expected {ref.dtype}")
        try:
            value = arr.numpy()
        except Exception:  # noqa: BLE001 - undecodable bytes
            return Verdict(False, f"array '{key}' cannot be decoded")
        if value.dtype.kind == "f" and not np.isfinite(value).all():
            return Verdict(False, f"array '{key}' holds NaN or infinite values")
        if value.dtype.kind == "f":
            sq += float(np.sum((value.astype(np.float64) - ref) ** 2))
        decoded[key] = value
    norm = math.sqrt(sq)
    if norm > max_update_norm:
        return Verdict(False, f"update norm {norm:.3g} exceeds bound {max_update_norm:.3g}")
    return Verdict(True, arrays=decoded)


def check_declared_count(msg: Message, declared: int) -> Verdict:
    """A train reply may not claim more examples than the site declared before training.

    Example counts weight FedAvg; a site inflating its count mid-run would buy itself a
    larger share of the global model. The preprocessing round's count is the site's own
    statement too, but it was made before anyone saw a model.
    """
    n = msg.content.metric_records["metrics"]["num-examples"]
    if declared > 0 and n > declared:
        return Verdict(False, f"num-examples {n!r} exceeds the {declared} declared in the preprocessing round")
    return Verdict(True)


def _check_extra(msg: Message) -> Verdict:
    """No records beyond the expected ones (a site has no reason to send anything else)."""
    extra = sorted(set(msg.content.config_records) - {"site"})
    if extra:
        return Verdict(False, f"unexpected record(s) {extra[:3]}")
    return Verdict(True)


def check_masked_reply(msg: Message, length: int) -> Verdict:
    """A secure-aggregation reply: one masked Z_2^64 vector of the layout's length."""
    verdict = answered(msg)
    if not verdict.ok:
        return verdict
    content = msg.content
    if set(content.array_records) != {"masked"} or set(content.array_records["masked"].keys()) != {"masked"}:
        return Verdict(False, "expected one masked vector")
    arr = content.array_records["masked"]["masked"]
    if np.dtype(arr.dtype) != np.uint64 or tuple(arr.shape) != (length,):
        return Verdict(False, f"masked vector has dtype {arr.dtype} and shape {tuple(arr.shape)}, expected uint64 ({length},)")
    try:
        arr.numpy()
    except Exception:  # noqa: BLE001 - undecodable bytes
        return Verdict(False, "masked vector cannot be decoded")
    return _check_extra(msg)


def check_evaluate_reply(msg: Message) -> Verdict:
    verdict = answered(msg)
    if verdict.ok and msg.content.array_records:
        return Verdict(False, "evaluate reply must not carry arrays")
    return verdict


def answered(msg: Message) -> Verdict:
    """A reply with content (not an error) whose metrics are well-formed."""
    if msg.has_error():
        return Verdict(False, f"error reply (code {msg.error.code}): {msg.error.reason}")
    if not msg.has_content():
        return Verdict(False, "reply has no content")
    return check_metrics(msg)
