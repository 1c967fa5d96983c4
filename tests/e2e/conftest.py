"""Fixtures of the end-to-end suite: a recording upstream SMTP server, `optgate serve`
processes started on free ports with a config written for the test, and their log
printed under any failing test. The building blocks live in helpers.py."""

import pytest

from helpers import BINARY, PASSWORD, Optgate, Upstream, gateway_config, hash_password, merge


def pytest_sessionstart(session):
    if not BINARY.exists():
        pytest.exit(f"{BINARY} is missing: run `cargo build --release` (tests/run does)", returncode=2)


@pytest.fixture(scope="session")
def password_hash() -> str:
    """An argon2 hash of PASSWORD for the config's [[smtp.account]]s."""
    return hash_password(PASSWORD)


@pytest.fixture(scope="module")
def upstream():
    """The mail server optgate relays to, shared by a module's tests (each test marks
    its messages with its own token or addresses)."""
    server = Upstream()
    server.start()
    yield server
    server.stop()


class Launcher:
    """Starts `optgate serve` instances, each in a fresh folder, and at the end stops
    every one still running, checking that SIGTERM makes it exit 0."""

    running: list = []  # every instance of the suite not yet torn down, for failure reports

    def __init__(self, tmp_path_factory, password_hash: str):
        self.tmp_path_factory = tmp_path_factory
        self.password_hash = password_hash
        self.gates: list[Optgate] = []

    def __call__(self, upstream_port: int, **overrides) -> Optgate:
        """A started gateway relaying to `upstream_port`; `overrides` are laid over
        the test config table by table, e.g. smtp={"trusted_networks": []}."""
        workdir = self.tmp_path_factory.mktemp("optgate")
        config = merge(gateway_config(workdir, upstream_port, self.password_hash), overrides)
        return self.adopt(Optgate(workdir / "optgate.toml", config))

    def adopt(self, gate: Optgate) -> Optgate:
        """Starts `gate` and stops it at teardown."""
        self.gates.append(gate)
        Launcher.running.append(gate)
        gate.start()
        return gate

    def stop_all(self):
        try:
            for gate in self.gates:
                if gate.running:
                    gate.stop()
        finally:
            for gate in self.gates:
                gate.kill()
                Launcher.running.remove(gate)


@pytest.fixture(scope="module")
def launch_shared(tmp_path_factory, password_hash):
    """Starts gateways that live as long as the test module."""
    launcher = Launcher(tmp_path_factory, password_hash)
    yield launcher
    launcher.stop_all()


@pytest.fixture
def launch(tmp_path_factory, password_hash):
    """Starts gateways that live as long as the test."""
    launcher = Launcher(tmp_path_factory, password_hash)
    yield launcher
    launcher.stop_all()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    """Under a failing test, the end of the log of every gateway alive."""
    report = yield
    if report.failed:
        for gate in Launcher.running:
            report.sections.append((f"optgate log {gate.log_path}", gate.log_tail()))
    return report
