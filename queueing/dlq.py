"""Drain and replay the dead-letter topic.

    python -m queueing.dlq list                 # what is there, with reasons
    python -m queueing.dlq replay [--request-id ID ...]

Reads KAFKA_* from the environment like the app. `list` reads without committing. `replay` sends each
replayable original (a valid request) back to the request topic marked as replayed, so its failed job
starts over with fresh attempts, and commits the DLQ offsets it handled under the group
`<prefix>.dlq-replay`, so a second run does not replay them again. Malformed originals are listed,
never replayed: fix the producer instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Any

from kafka import KafkaConsumer, TopicPartition

from queueing.kafka import KafkaSettings, LazyProducer, RequestSender
from queueing.messages import MalformedMessage, decode_request, original_bytes

logger = logging.getLogger("dlq")


def settings_from_env(env: dict[str, str]) -> KafkaSettings:
    return KafkaSettings(
        bootstrap_servers=env["KAFKA_BOOTSTRAP_SERVERS"],
        topic_prefix=env.get("KAFKA_TOPIC_PREFIX") or "image_generation",
        security_protocol=env.get("KAFKA_SECURITY_PROTOCOL") or "PLAINTEXT",
        sasl_mechanism=env.get("KAFKA_SASL_MECHANISM") or None,
        sasl_username=env.get("KAFKA_SASL_USERNAME") or None,
        sasl_password=env.get("KAFKA_SASL_PASSWORD") or None,
    )


def read_dead_letters(settings: KafkaSettings, group: str | None) -> tuple[KafkaConsumer, list]:
    """Everything from the group's committed offsets (or the start) to the current end. Partitions are
    assigned, not subscribed: no group join to wait for, and commits still land under `group`."""
    consumer = KafkaConsumer(group_id=group, enable_auto_commit=False, auto_offset_reset="earliest",
                             **settings.client_options())
    partitions = [TopicPartition(settings.dlq_topic, p) for p in consumer.partitions_for_topic(settings.dlq_topic) or ()]
    consumer.assign(partitions)
    ends = consumer.end_offsets(partitions)
    messages = []
    while any(consumer.position(p) < ends[p] for p in partitions):
        for batch in consumer.poll(timeout_ms=1000).values():
            messages.extend(batch)
    return consumer, messages


def _original_request(entry: dict[str, Any]):
    raw = original_bytes(entry)
    if raw is None:
        raise MalformedMessage("the original was not kept whole")
    return decode_request(raw)


def replay(settings: KafkaSettings, request_ids: set[str] | None = None) -> dict[str, int]:
    """Resend the replayable originals. A full replay commits what it read, so a second one resends
    nothing; a replay of chosen request ids commits nothing, so the other dead letters stay there
    for a later replay (resending an id twice is harmless: a done job is not redone)."""
    consumer, messages = read_dead_letters(settings, f"{settings.topic_prefix}.dlq-replay")
    sender = RequestSender(settings, LazyProducer(settings))
    counts = {"replayed": 0, "skipped": 0, "malformed": 0}
    for message in messages:
        entry = json.loads(message.value)
        try:
            envelope = _original_request(entry)
        except (MalformedMessage, ValueError):
            counts["malformed"] += 1
            continue
        if request_ids and envelope.request.request_id not in request_ids:
            counts["skipped"] += 1
            continue
        sender.send(envelope.request, replayed=True)
        counts["replayed"] += 1
    if not request_ids:
        consumer.commit()
    consumer.close()
    sender.producer.close()
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=["list", "replay"])
    parser.add_argument("--request-id", action="append", default=[], help="replay only these (repeatable)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    if not os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        logger.error("set KAFKA_BOOTSTRAP_SERVERS (and KAFKA_TOPIC_PREFIX) as for the app")
        return 2
    settings = settings_from_env(dict(os.environ))
    if args.action == "list":
        consumer, messages = read_dead_letters(settings, group=None)
        for message in messages:
            entry = json.loads(message.value)
            logger.info("offset %d request %s attempts %s: %s", message.offset, entry.get("request_id"),
                        entry.get("attempts"), entry.get("reason"))
        consumer.close()
        logger.info("%d dead letters", len(messages))
        return 0
    counts = replay(settings, set(args.request_id) or None)
    logger.info("replayed %(replayed)d, skipped %(skipped)d, malformed (not replayable) %(malformed)d", counts)
    return 0


if __name__ == "__main__":
    sys.exit(main())
