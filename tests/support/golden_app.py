"""A Faust worker with only the golden agent and snapshot timer (`streams.flywheel.app.add_golden_agent`), for tests.

python tests/support/golden_app.py     # settings from VLMFLOW_* variables; stop with SIGTERM
"""

from __future__ import annotations

import faust

from schemas.settings import load_settings
from streams.flywheel.app import add_golden_agent, faust_app
from streams.flywheel.metrics import StreamsMetrics
from streams.flywheel.stage import Counts


def main() -> None:
    settings = load_settings()
    app = faust_app(settings, app_id=settings.streams.app_id, datadir=str(settings.state_dir / "golden-app"))
    add_golden_agent(app, settings, Counts(), StreamsMetrics())
    faust.Worker(app, loglevel="INFO").execute_from_commandline()


if __name__ == "__main__":
    main()
