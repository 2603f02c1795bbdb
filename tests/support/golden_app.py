"""A Faust worker with only the golden agent and snapshot timer (`streams.flywheel.app.add_golden_agent`), for tests.

python tests/support/golden_app.py     # settings from VLMFLOW_* variables; stop with SIGTERM
"""

from __future__ import annotations

import faust

from schemas.settings import load_settings
from streams.flywheel.app import add_golden_agent


def main() -> None:
    settings = load_settings()
    session_s = settings.kafka.session_timeout_ms / 1000
    app = faust.App(
        settings.streams.app_id,
        broker=f"kafka://{settings.kafka.bootstrap_servers}",
        broker_session_timeout=session_s,
        broker_heartbeat_interval=session_s / 3,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        store="memory://",
        datadir=str(settings.state_dir / "golden-app"),
        web_enabled=False,
        topic_partitions=1,
        key_serializer="raw",
        value_serializer="raw",
    )
    add_golden_agent(app, settings)
    faust.Worker(app, loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
