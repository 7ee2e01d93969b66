"""Shared fixtures: throw-away TLS material and keys, started/stopped protocol fakes, and the web app
in-process (WebTest) with users and chats."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import pytest
import sqlalchemy as sa

from chat_app.app import create_app
from notifier import db
from notifier.config import Settings
from tests.e2e import running_fakes
from tests.harness import UwsgiServer
from tests.fakes.apns import APNsFake
from tests.fakes.fcm import FCMFake, point_pyfcm_at
from tests.fakes.tls import TLSMaterial, make_apns_key, make_service_account, make_tls_material
from tests.webapp import ContractTestApp, User

APNS_TOPIC = "com.example.chat"
APNS_KEY_ID = "TESTKEY001"  # Apple's key ids and team ids are 10 characters
APNS_TEAM_ID = "TEAM123456"
FCM_PROJECT = "test-project"


@dataclass(frozen=True)
class APNsKey:
    p8_path: Path
    public_key_pem: bytes
    key_id: str = APNS_KEY_ID
    team_id: str = APNS_TEAM_ID

    @property
    def p8_text(self) -> str:
        """What aioapns 4.x wants as `key=` (the key's contents, not its path)."""
        return self.p8_path.read_text()


@pytest.fixture(scope="session")
def tls_material(tmp_path_factory: pytest.TempPathFactory) -> TLSMaterial:
    return make_tls_material(tmp_path_factory.mktemp("tls"), client_topic=APNS_TOPIC)


@pytest.fixture(scope="session")
def apns_key(tmp_path_factory: pytest.TempPathFactory) -> APNsKey:
    p8_path, public_pem = make_apns_key(tmp_path_factory.mktemp("apns-key"), key_id=APNS_KEY_ID)
    return APNsKey(p8_path, public_pem)


@pytest.fixture
def apns_fake(tls_material: TLSMaterial, apns_key: APNsKey) -> Iterator[APNsFake]:
    """APNs fake with provider-token auth, started; stopped after the test."""
    fake = APNsFake(
        tls_material,
        topic=APNS_TOPIC,
        key_id=apns_key.key_id,
        team_id=apns_key.team_id,
        public_key_pem=apns_key.public_key_pem,
    )
    with fake:
        yield fake


@pytest.fixture
def apns_cert_fake(tls_material: TLSMaterial) -> Iterator[APNsFake]:
    """APNs fake with certificate auth (client cert must chain to the test CA)."""
    with APNsFake(tls_material, topic=APNS_TOPIC, client_cert_auth=True) as fake:
        yield fake


@pytest.fixture
def fcm_fake(tls_material: TLSMaterial) -> Iterator[FCMFake]:
    with FCMFake(tls_material, project_id=FCM_PROJECT) as fake:
        yield fake


@pytest.fixture
def fcm_service_account(fcm_fake: FCMFake, tmp_path: Path) -> Path:
    """A service-account JSON whose token_uri is the fake's, registered with the fake."""
    path, public_pem = make_service_account(tmp_path, fcm_fake.token_uri, project_id=FCM_PROJECT)
    info = json.loads(path.read_text())
    fcm_fake.add_service_account(info["client_email"], public_pem, info["private_key_id"])
    return path


@pytest.fixture
def fcm_trust(fcm_fake: FCMFake, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make `requests` (pyfcm's session and google-auth's token request) trust the test CA
    and never send loopback traffic to a proxy."""
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(fcm_fake.tls.ca_cert))
    monkeypatch.delenv("CURL_CA_BUNDLE", raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def pyfcm_client(fcm_fake: FCMFake, fcm_service_account: Path, fcm_trust: None):
    """A real pyfcm.FCMNotification talking to the FCM fake (its default retrying adapter)."""
    from pyfcm import FCMNotification

    client = FCMNotification(service_account_file=str(fcm_service_account), project_id=FCM_PROJECT)
    point_pyfcm_at(client, fcm_fake)
    return client


# ---------------------------------------------------------------- the web app in-process (WebTest)

@pytest.fixture
def wakes() -> list:
    """One entry per call of the app's dispatcher wake-up."""
    return []


@pytest.fixture(scope="session")
def schema_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty SQLite database with the schema, copied for each test (creating the schema is the slow part)."""
    path = tmp_path_factory.mktemp("template") / "chat.sqlite3"
    engine = db.make_engine(f"sqlite:///{path}")
    db.migrate(engine)
    engine.dispose()
    return path


@pytest.fixture
def app_settings(tmp_path: Path, schema_template: Path) -> Settings:
    """A fresh SQLite database per test; run dir (metrics files) inside the test's tmp_path."""
    shutil.copyfile(schema_template, tmp_path / "chat.sqlite3")
    return Settings(database_url=f"sqlite:///{tmp_path}/chat.sqlite3", apns_topic=APNS_TOPIC,
                    push_run_dir=str(tmp_path / "run"))


@pytest.fixture
def app(app_settings: Settings, wakes: list) -> ContractTestApp:
    """The Bottle app in-process; every answer is checked against /openapi.json."""
    return ContractTestApp(create_app(app_settings, wake=lambda: wakes.append(True)))


@pytest.fixture
def app_engine(app: ContractTestApp) -> sa.Engine:
    """The app's own database engine, to look at or prepare rows behind its back."""
    return app.app.config["chat.context"].engine


@pytest.fixture
def signup(app: ContractTestApp):
    """signup(name) -> User(id, name, token, headers), through POST /v1/users."""
    def signup(name: str = "ann") -> User:
        body = app.post_json("/v1/users", {"name": name}, status=201).json
        return User(body["id"], body["name"], body["token"])
    return signup


@pytest.fixture
def make_chat(app: ContractTestApp):
    """make_chat(creator, *members, name=...) -> the chat's JSON, through POST /v1/chats."""
    def make_chat(creator: User, *members: User, name: str = "chat") -> dict:
        body = {"name": name, "member_ids": [member.id for member in members]}
        return app.post_json("/v1/chats", body, headers=creator.headers, status=201).json
    return make_chat


@pytest.fixture
def fakes(tmp_path: Path):
    """Both protocol fakes for a test's uWSGI servers (tests.e2e.running_fakes), stopped at the end."""
    with running_fakes(tmp_path / "fakes") as fakes:
        yield fakes


@pytest.fixture
def servers(tmp_path):
    """Servers started by a test, all closed (uWSGI and dispatchers) at the end."""
    started = []

    def start(fakes, env=None, args=(), workers=4, database_url=None):
        server = UwsgiServer(tmp_path / f"server{len(started)}", env={**fakes.env, **(env or {})}, args=args,
                             workers=workers, database_url=database_url)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()
