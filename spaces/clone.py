"""Clone the Space to add capacity to the fleet.

    HF_TOKEN=... KAFKA_BOOTSTRAP_SERVERS=... REDIS_URL=... R2_... \\
        python spaces/clone.py --source crafterse/imagegen --target crafterse/imagegen-2 --hardware cpu-upgrade

Duplicating a Space copies its files and variables but not its secrets, so this sets every secret and
variable the clone needs, from this shell's environment (the same names the app reads). Safe to run
twice: an existing target is found first and updated in place (duplicating onto it would fail).
Secret values are never printed. The default hardware is `cpu-upgrade`, set never to sleep: a fleet
worker has no visitors, and free `cpu-basic` Spaces sleep after 48 hours without any. Variables that
make a Space UI-only or name one worker (KAFKA_CONSUME, WORKER_NAME) are not carried into a clone.

This file is operator tooling: the app never imports it, and this folder has no __init__.py (a package
named `spaces` would shadow Hugging Face's own package on the Space).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("clone")

SECRET_NAMES = ("KAFKA_SASL_USERNAME", "KAFKA_SASL_PASSWORD", "REDIS_URL", "R2_ACCESS_KEY_ID",
                "R2_SECRET_ACCESS_KEY", "S3_FALLBACK_ACCESS_KEY_ID", "S3_FALLBACK_SECRET_ACCESS_KEY",
                "REPLICATE_API_TOKEN")
VARIABLE_NAMES = ("KAFKA_BOOTSTRAP_SERVERS", "KAFKA_SECURITY_PROTOCOL", "KAFKA_SASL_MECHANISM",
                  "KAFKA_TOPIC_PREFIX", "KAFKA_GROUP_ID", "R2_ACCOUNT_ID", "S3_ENDPOINT_URL", "R2_BUCKET",
                  "R2_PUBLIC_BASE_URL", "MODEL_PRESET", "MODEL_ID", "TINY_VAE_ID",
                  "S3_FALLBACK_ENDPOINT_URL", "S3_FALLBACK_BUCKET", "S3_FALLBACK_PUBLIC_BASE_URL",
                  "REMOTE_PREDICTIONS_URL", "REPLICATE_MODEL", "OVERFLOW_AFTER_SECONDS", "REMOTE_SHARE",
                  "REMOTE_MAX_PER_HOUR")
# Without these the clone would run alone instead of joining the fleet.
REQUIRED = ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")
# The source's own role: a clone meant to add capacity must consume, under a name of its own.
NOT_CARRIED = ("KAFKA_CONSUME", "WORKER_NAME")
DEFAULT_HARDWARE = "cpu-upgrade"
FREE_HARDWARE = "cpu-basic"  # sleeps after 48 h without visitors; its sleep time cannot be changed
NEVER_SLEEP = -1


@dataclass(frozen=True)
class ClonePlan:
    source: str
    target: str
    hardware: str
    private: bool
    secrets: dict[str, str] = field(repr=False)
    variables: dict[str, str]

    def describe(self) -> str:
        lines = [f"clone {self.source} -> {self.target} on {self.hardware} ({'private' if self.private else 'public'})"]
        lines += [f"  secret   {name} (set, value hidden)" for name in sorted(self.secrets)]
        lines += [f"  variable {name}={value}" for name, value in sorted(self.variables.items())]
        return "\n".join(lines)


def plan_clone(source: str, target: str, hardware: str, private: bool, env: Mapping[str, str]) -> ClonePlan:
    missing = [name for name in REQUIRED if not env.get(name)]
    if missing:
        raise ValueError(f"set {', '.join(missing)} in the environment: the clone needs them to join the fleet")
    return ClonePlan(source, target, hardware, private,
                     secrets={n: env[n] for n in SECRET_NAMES if env.get(n)},
                     variables={n: env[n] for n in VARIABLE_NAMES if env.get(n)})


def apply_clone(api: Any, plan: ClonePlan) -> str:
    """Duplicate the source Space, or update the target if it exists. `api` is a huggingface_hub.HfApi."""
    if api.repo_exists(plan.target, repo_type="space"):
        # duplicate_repo(exist_ok=True) would swallow the Hub's 409 and then fail reading its body
        logger.info("%s exists: updating it", plan.target)
        url = f"{api.endpoint}/spaces/{plan.target}"
    else:
        url = api.duplicate_repo(
            plan.source, plan.target, repo_type="space", private=plan.private, space_hardware=plan.hardware,
            space_secrets=[{"key": k, "value": v} for k, v in plan.secrets.items()],
            space_variables=[{"key": k, "value": v} for k, v in plan.variables.items()],
        )
    for key, value in plan.secrets.items():
        api.add_space_secret(plan.target, key, value)
    for key, value in plan.variables.items():
        api.add_space_variable(plan.target, key, value)
    carried = api.get_space_variables(plan.target)  # duplication copies all of the source's variables
    for key in NOT_CARRIED:
        if key in carried:
            api.delete_space_variable(plan.target, key)
    api.request_space_hardware(plan.target, plan.hardware)
    if plan.hardware != FREE_HARDWARE:
        api.set_space_sleep_time(plan.target, NEVER_SLEEP)
    else:
        logger.warning("%s sleeps after 48 hours without visitors, and a Kafka consumer is none: use "
                       "paid hardware (--hardware %s) for a fleet worker", FREE_HARDWARE, DEFAULT_HARDWARE)
    return str(url)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", required=True, help="the Space to copy, e.g. crafterse/imagegen")
    parser.add_argument("--target", required=True, help="the new Space, e.g. crafterse/imagegen-2")
    parser.add_argument("--hardware", default=DEFAULT_HARDWARE,
                        help="cpu-upgrade (default, never sleeps), t4-small, l4x1, ...; cpu-basic sleeps after 48 h")
    parser.add_argument("--public", action="store_true", help="make the clone public (default private)")
    parser.add_argument("--dry-run", action="store_true", help="print what would be set, change nothing")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(message)s")
    try:
        plan = plan_clone(args.source, args.target, args.hardware, not args.public, os.environ)
    except ValueError as error:
        logger.error("%s", error)
        return 2
    logger.info("%s", plan.describe())
    if args.dry_run:
        return 0
    from huggingface_hub import HfApi

    logger.info("done: %s", apply_clone(HfApi(), plan))
    return 0


if __name__ == "__main__":
    sys.exit(main())
