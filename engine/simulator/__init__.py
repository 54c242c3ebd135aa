"""emnify API simulator: the real API's wire behaviour over loopback HTTP, for tests and the demo.

Start one with `SimulatorServer(SimulatorConfig(...))` as a context manager; drive it through
its `state` or the `/admin` API.
"""

from engine.simulator.app import create_app
from engine.simulator.config import FIRST_EVENT_ID, ORGANISATION_ID, SimulatorConfig
from engine.simulator.fault_rules import FaultRule, FaultRuleError
from engine.simulator.fleet import FIRST_ENDPOINT_ID, FIRST_SIM_ID, Fleet, build_fleet
from engine.simulator.generator import EventGenerator, generate_events
from engine.simulator.organisations import organisation_configs
from engine.simulator.server import OrganisationsSimulator, SimulatorServer, banner, serve
from engine.simulator.state import SimulatorState
from engine.simulator.streamer import StreamerPusher

__all__ = [
    "FIRST_ENDPOINT_ID",
    "FIRST_EVENT_ID",
    "FIRST_SIM_ID",
    "ORGANISATION_ID",
    "EventGenerator",
    "FaultRule",
    "FaultRuleError",
    "Fleet",
    "OrganisationsSimulator",
    "SimulatorConfig",
    "SimulatorServer",
    "SimulatorState",
    "StreamerPusher",
    "banner",
    "build_fleet",
    "create_app",
    "generate_events",
    "organisation_configs",
    "serve",
]
