"""An in-process Flower Grid: the real ServerApp talks to real ClientApps, no network.

Each virtual hospital is a node with its own ``Context`` (node config and persistent
state, as a SuperNode keeps them), so the ClientApp behaves exactly as deployed. Messages
are handed over in memory, one site after another, which keeps the harness' own cost
near zero and the run deterministic for a seed.

``unreachable`` lets tests take a site offline from a given round on (no reply, as a
SuperNode that stopped answering).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator
from typing import Callable, Mapping

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid
from flwr.supercore.run import Run

from ..shared import errors

log = logging.getLogger("fedcare.simulation")

#: Record holding a node's config inside a checkpointed state (never seen by the ClientApp).
NODE_CONFIG = "fedcare.node-config"


class InProcessGrid(Grid):
    def __init__(self, client_app: ClientApp, node_configs: Mapping[int, dict], run_config: dict,
                 run_id: int = 1, unreachable: Callable[[int, Message], bool] | None = None,
                 tap: Callable[[Message], None] | None = None,
                 apps: Mapping[int, ClientApp] | None = None) -> None:
        self._client_app = client_app
        #: Per-node ClientApps replacing ``client_app`` (tests put a hostile hospital here).
        self._apps = dict(apps or {})
        self._contexts = {
            node: Context(run_id=run_id, node_id=node, node_config=dict(cfg), state=RecordDict(),
                          run_config=dict(run_config))
            for node, cfg in node_configs.items()
        }
        self._run = Run.create_empty(run_id)
        self._ids = itertools.count(1)
        self._unreachable = unreachable
        self._tap = tap

    # -- Grid interface -------------------------------------------------------------
    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        self._pending = {}
        ids = []
        for msg in messages:
            mid = f"m{next(self._ids)}"
            msg.metadata.__dict__["_message_id"] = mid
            msg.metadata.__dict__["_run_id"] = self._run.run_id
            self._pending[mid] = msg
            ids.append(mid)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return list(self._replies(message_ids))

    def _replies(self, message_ids: Iterable[str]) -> Iterator[Message]:
        for mid in message_ids:
            reply = self._deliver(self._pending.pop(mid))
            if reply is not None:
                yield reply

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """Replies one at a time, each computed when the caller asks for it.

        A generator, so the coordinator folds each update into its aggregate before the
        next hospital trains: with a thousand sites no list of updates ever exists.
        """
        yield from self._replies(list(self.push_messages(messages)))

    # -- persistent node state (checkpoints) -----------------------------------------
    def node_states(self) -> dict[int, bytes]:
        """Each virtual hospital's ``Context.state`` (accountant history, local weights)."""
        from flwr.common.serde import recorddict_to_proto

        out = {}
        for node, ctx in self._contexts.items():
            # The node's config travels with its state so that a checkpoint alone is
            # enough to rebuild the federation (``runner.resume``).
            record = RecordDict({**dict(ctx.state.items()), NODE_CONFIG: ConfigRecord(dict(ctx.node_config))})
            out[node] = recorddict_to_proto(record).SerializeToString()
        return out

    def restore_node_states(self, states: Mapping[int, bytes]) -> None:
        from flwr.common.serde import recorddict_from_proto
        from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

        unknown = set(states) - set(self._contexts)
        if unknown:
            raise ValueError(f"checkpoint holds state for node(s) this federation lacks: {sorted(unknown)[:5]}")
        for node, blob in states.items():
            state = recorddict_from_proto(ProtoRecordDict.FromString(blob))
            state.pop(NODE_CONFIG, None)
            self._contexts[node].state = state

    # -- delivery ---------------------------------------------------------------------
    def context(self, node_id: int) -> Context:
        return self._contexts[node_id]

    def _deliver(self, msg: Message) -> Message | None:
        node = msg.metadata.dst_node_id
        if node not in self._contexts:
            return None
        if self._unreachable is not None and self._unreachable(node, msg):
            return None
        try:
            reply = self._apps.get(node, self._client_app)(msg, self._contexts[node])
        except Exception as exc:  # noqa: BLE001 - as Flower does: an error reply, not a crash
            log.error("ClientApp on node %d raised %s", node, type(exc).__name__)
            reply = Message(Error(errors.INTERNAL_ERROR, errors.WIRE_REASONS[errors.INTERNAL_ERROR]), reply_to=msg)
        reply.metadata.__dict__["_message_id"] = f"r{next(self._ids)}"
        if self._tap is not None:
            self._tap(reply)
        return reply


def node_configs_from_states(states: Mapping[int, bytes]) -> dict[int, dict]:
    """The node configs stored by ``InProcessGrid.node_states``."""
    from flwr.common.serde import recorddict_from_proto
    from flwr.proto.recorddict_pb2 import RecordDict as ProtoRecordDict

    out = {}
    for node, blob in states.items():
        state = recorddict_from_proto(ProtoRecordDict.FromString(blob))
        out[node] = dict(state.config_records[NODE_CONFIG])
    return out
