"""The Web Push fake (tests/fakes/webpush.py) against a real client: pywebpush (requests).

Every push goes through `pywebpush.webpush()` (encryption, VAPID signing, the POST); where a
case needs a request pywebpush would never make (another key's JWT, a JWT without a proper
`sub`, no TTL header) the headers are made by hand or the requests session drops one, and
pywebpush still encrypts and sends.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

import jwt
import pytest
import requests
from cryptography.hazmat.primitives import serialization
from py_vapid import Vapid, b64urlencode
from pywebpush import WebPushException, webpush

from tests.fakes.tls import TLSMaterial
from tests.fakes.webpush import MAX_PAYLOAD, WebPushFake

pytestmark = pytest.mark.timeout(60)

SUB = "mailto:ops@example.com"
PUSH_TIMEOUT = 10  # seconds, for every request pywebpush makes
# pywebpush's aes128gcm body: salt(16) + rs(4) + idlen(1) + key(65), then data + delimiter + tag(16)
BODY_OVERHEAD = 16 + 4 + 1 + 65 + 1 + 16


@pytest.fixture
def fake(tls_material: TLSMaterial) -> Iterator[WebPushFake]:
    fake = WebPushFake(tls_material).start()
    try:
        yield fake
    finally:
        fake.stop()


def trusting(sess: requests.Session, tls: TLSMaterial) -> requests.Session:
    """Make `sess` trust the fakes' CA. trust_env off: requests lets REQUESTS_CA_BUNDLE (set on
    this machine) override a session's `verify`, and no proxy from the environment either."""
    sess.trust_env = False
    sess.verify = str(tls.ca_cert)
    return sess


@pytest.fixture
def session(tls_material: TLSMaterial) -> Iterator[requests.Session]:
    """A requests session trusting the fakes' CA (one keep-alive connection, reused)."""
    sess = trusting(requests.Session(), tls_material)
    try:
        yield sess
    finally:
        sess.close()


@pytest.fixture(scope="module")
def vapid() -> Vapid:
    key = Vapid()
    key.generate_keys()
    return key


@pytest.fixture(scope="module")
def other_vapid() -> Vapid:
    key = Vapid()
    key.generate_keys()
    return key


def public_raw(key: Vapid) -> bytes:
    return key.public_key.public_bytes(serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint)


def push(
    subscription: Dict[str, Any],
    data: Optional[str],
    session: requests.Session,
    *,
    vapid_key: Any = None,
    claims: Optional[Dict[str, Any]] = None,
    ttl: int = 60,
    headers: Optional[Dict[str, str]] = None,
    **kwargs: Any,
) -> requests.Response:
    """pywebpush.webpush(); the response whatever its status (pywebpush raises past 202)."""
    try:
        return webpush(
            subscription,
            data,
            vapid_private_key=vapid_key,
            vapid_claims=dict(claims) if claims is not None else None,  # pywebpush mutates it
            ttl=ttl,
            headers=headers,
            requests_session=session,
            timeout=PUSH_TIMEOUT,
            **kwargs,
        )
    except WebPushException as exc:
        assert exc.response is not None, exc
        return exc.response


def error(response: requests.Response) -> Dict[str, Any]:
    doc = response.json()
    assert doc["code"] == response.status_code
    return doc


def last(fake: WebPushFake):
    assert fake.wait_answered(len(fake.received) or 1, 5)
    return fake.received[-1]


# -- accepted --------------------------------------------------------------------------------


def test_valid_push_is_201_and_recorded_decrypted(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    assert sub["endpoint"].startswith(f"https://127.0.0.1:{fake.port}/push/")
    assert len(sub["keys"]["p256dh"]) == 87 and "=" not in sub["keys"]["p256dh"]  # 65 bytes
    assert len(sub["keys"]["auth"]) == 22  # 16 bytes
    doc = {"type": "message", "chat": 42, "text": "héllo ✓", "nested": {"a": [1, 2, None]}}

    response = push(sub, json.dumps(doc), session, vapid_key=vapid, claims={"sub": SUB},
                    headers={"Urgency": "high", "Topic": "chat-42"})

    assert response.status_code == 201, response.text
    assert response.headers["Location"].startswith(f"{fake.origin}/m/")
    assert response.headers["TTL"] == "60"
    assert fake.wait_for(1, 5)
    record = fake.received[-1]
    assert record.endpoint == sub["endpoint"]
    assert record.payload == doc
    assert record.plaintext == json.dumps(doc).encode()
    assert record.status == 201 and record.reason is None
    assert record.claims["aud"] == fake.origin and record.claims["sub"] == SUB
    assert record.claims["exp"] > time.time()
    assert record.headers["content-encoding"] == "aes128gcm"
    assert record.headers["ttl"] == "60" and record.headers["urgency"] == "high"
    assert record.headers["authorization"].startswith("vapid t=")
    assert response.headers["Location"].endswith(record.message_id)
    assert fake.sent_endpoints() == {sub["endpoint"]: 1}


def test_vapid_key_from_pem_file_non_json_and_empty_payloads(
    fake: WebPushFake, session: requests.Session, vapid: Vapid, tmp_path: Path
):
    pem = tmp_path / "vapid.pem"
    vapid.save_key(str(pem))
    sub = fake.subscribe()
    assert push(sub, "not json", session, vapid_key=str(pem), claims={"sub": SUB}).status_code == 201
    assert last(fake).payload == b"not json"
    # RFC 8030 allows a push without payload: no Content-Encoding needed
    assert push(sub, None, session, vapid_key=vapid, claims={"sub": SUB}, ttl=0).status_code == 201
    record = last(fake)
    assert record.payload is None and record.body_size == 0 and record.headers["ttl"] == "0"
    assert fake.sent_endpoints()[sub["endpoint"]] == 2


def test_largest_body_accepted_and_one_byte_more_is_413(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    fits = "x" * (MAX_PAYLOAD - BODY_OVERHEAD)
    response = push(sub, fits, session, vapid_key=vapid, claims={"sub": SUB})
    assert response.status_code == 201, response.text
    assert last(fake).body_size == MAX_PAYLOAD

    response = push(sub, fits + "x", session, vapid_key=vapid, claims={"sub": SUB})
    assert response.status_code == 413
    assert error(response)["errno"] == 104
    assert push(sub, "y" * 6000, session, vapid_key=vapid, claims={"sub": SUB}).status_code == 413
    assert fake.sent_endpoints()[sub["endpoint"]] == 1


def test_connection_reused_and_concurrent_clients(fake: WebPushFake, session: requests.Session,
                                                  vapid: Vapid, tls_material: TLSMaterial):
    sub = fake.subscribe()
    for i in range(10):
        assert push(sub, json.dumps({"i": i}), session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201
    assert fake.connections == 1

    failures = []

    def client(n: int) -> None:
        with trusting(requests.Session(), tls_material) as own:
            for i in range(5):
                response = push(sub, json.dumps({"client": n, "i": i}), own, vapid_key=vapid, claims={"sub": SUB})
                if response.status_code != 201:
                    failures.append(response.text)

    threads = [threading.Thread(target=client, args=(n,), daemon=True) for n in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not failures
    assert fake.wait_for(40, 10)
    assert fake.connections == 7
    assert {(r.payload["client"], r.payload["i"]) for r in fake.received if "client" in r.payload} == {
        (n, i) for n in range(6) for i in range(5)
    }
    assert fake.server_errors == []


# -- VAPID -----------------------------------------------------------------------------------


def test_jwt_signed_by_another_key_than_k_is_401(fake: WebPushFake, session: requests.Session,
                                                  vapid: Vapid, other_vapid: Vapid):
    sub = fake.subscribe()
    claims = {"sub": SUB, "aud": fake.origin, "exp": int(time.time()) + 3600}
    token = vapid.sign(dict(claims))["Authorization"].split("t=", 1)[1].split(",k=")[0]
    other_k = b64urlencode(public_raw(other_vapid))
    response = push(sub, '{"a": 1}', session, headers={"Authorization": f"vapid t={token}, k={other_k}"})
    assert response.status_code == 401
    assert error(response)["errno"] == 109 and "signature" in error(response)["message"]
    assert fake.sent_endpoints() == {}


def test_restricted_subscription_refuses_another_key_403(fake: WebPushFake, session: requests.Session,
                                                         vapid: Vapid, other_vapid: Vapid):
    sub = fake.subscribe(application_server_key=b64urlencode(public_raw(vapid)))
    assert push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201
    response = push(sub, "{}", session, vapid_key=other_vapid, claims={"sub": SUB})
    assert response.status_code == 403 and "mismatch" in error(response)["message"]


def test_aud_of_another_origin_is_401(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    for aud in ("https://push.example.net", f"https://localhost:{fake.port}", f"http://127.0.0.1:{fake.port}"):
        response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB, "aud": aud})
        assert response.status_code == 401, aud
        assert "audience" in error(response)["message"]
    assert last(fake).claims is None


def test_exp_over_24h_and_expired_are_401(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    response = push(sub, "{}", session, vapid_key=vapid,
                    claims={"sub": SUB, "exp": int(time.time()) + 24 * 3600 + 120})
    assert response.status_code == 401 and "too long" in error(response)["message"]
    # pywebpush replaces a past exp, so this JWT is signed by hand (same key, same header)
    expired = vapid.sign({"sub": SUB, "aud": fake.origin, "exp": int(time.time()) - 5})
    response = push(sub, "{}", session, headers=expired)
    assert response.status_code == 401 and "expired" in error(response)["message"]
    # exactly 24 h ahead is still fine
    response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB, "exp": int(time.time()) + 24 * 3600})
    assert response.status_code == 201, response.text


def test_sub_scheme_and_authorization_form_are_checked(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    k = b64urlencode(public_raw(vapid))

    def signed(claims: Dict[str, Any]) -> str:
        return jwt.encode(claims, vapid.private_key, algorithm="ES256")

    base = {"aud": fake.origin, "exp": int(time.time()) + 600}
    for claims in (base, {**base, "sub": "ops@example.com"}, {**base, "sub": 7}):
        response = push(sub, "{}", session, headers={"Authorization": f"vapid t={signed(claims)}, k={k}"})
        assert response.status_code == 401 and "subject" in error(response)["message"].lower(), claims
    good = signed({**base, "sub": "https://example.com/contact"})
    assert push(sub, "{}", session, headers={"Authorization": f"vapid t={good}, k={k}"}).status_code == 201

    for authorization in (
        None,  # no Authorization at all
        f"WebPush {good}",  # the draft scheme (with Crypto-Key) is not accepted
        f"Bearer {good}",
        f"vapid t={good}",  # no k
        f"vapid k={k}",  # no t
        f"vapid t={good}, k=not-a-key",
        f"vapid t=abc.def.ghi, k={k}",
        f"vapid t={jwt.encode({**base, 'sub': SUB}, 'x' * 32, algorithm='HS256')}, k={k}",
    ):
        headers = {"Crypto-Key": f"p256ecdsa={k}"}
        if authorization is not None:
            headers["Authorization"] = authorization
        response = push(sub, "{}", session, headers=headers)
        assert response.status_code == 401, authorization
        assert error(response)["errno"] == 109
    assert fake.sent_endpoints()[sub["endpoint"]] == 1


# -- headers and body ------------------------------------------------------------------------


class _DropHeader(requests.Session):
    """A session that drops one request header: pywebpush always sends TTL."""

    def __init__(self, name: str) -> None:
        super().__init__()
        self.name = name.lower()

    def post(self, url, data=None, json=None, **kwargs):  # noqa: A002 - requests' names
        headers = {k: v for k, v in (kwargs.pop("headers", None) or {}).items() if k.lower() != self.name}
        return super().post(url, data=data, json=json, headers=headers, **kwargs)


def test_missing_ttl_is_400(fake: WebPushFake, vapid: Vapid, tls_material: TLSMaterial):
    sub = fake.subscribe()
    with trusting(_DropHeader("ttl"), tls_material) as no_ttl:
        response = push(sub, "{}", no_ttl, vapid_key=vapid, claims={"sub": SUB})
    assert response.status_code == 400
    assert error(response)["errno"] == 111 and error(response)["message"] == "Missing TTL value"
    assert "ttl" not in last(fake).headers


@pytest.mark.parametrize(
    "headers, ttl, errno",
    [
        ({}, -1, 114),
        ({"TTL": "soon"}, 0, 111),
        ({"Topic": "t" * 33}, 60, 113),  # too long
        ({"Topic": "chat/42"}, 60, 113),  # outside base64url
        ({"Urgency": "urgent"}, 60, None),
    ],
    ids=["negative-ttl", "ttl-not-integer", "topic-too-long", "topic-alphabet", "urgency"],
)
def test_bad_headers_are_400(fake: WebPushFake, session: requests.Session, vapid: Vapid,
                             headers: Dict[str, str], ttl: int, errno: Optional[int]):
    sub = fake.subscribe()
    response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}, headers=headers, ttl=ttl)
    assert response.status_code == 400, response.text
    assert error(response)["errno"] == errno
    assert fake.sent_endpoints() == {}


def test_topic_of_32_characters_is_fine(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}, headers={"Topic": "a-Z_9" * 6 + "xy"})
    assert response.status_code == 201, response.text


def test_legacy_aesgcm_encoding_is_400(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}, content_encoding="aesgcm")
    assert response.status_code == 400 and error(response)["errno"] == 110


def test_body_encrypted_for_another_subscription_is_400(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    target, other = fake.subscribe(), fake.subscribe()
    wrong_keys = {"endpoint": target["endpoint"], "keys": other["keys"]}
    response = push(wrong_keys, '{"secret": true}', session, vapid_key=vapid, claims={"sub": SUB})
    assert response.status_code == 400
    assert error(response)["errno"] == 110 and "decrypt" in error(response)["message"]
    record = last(fake)
    assert record.payload is None and record.claims is not None  # VAPID passed, decryption did not
    # the same keys' owner can read it: the body itself is fine
    assert push(other, '{"secret": true}', session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201


# -- subscriptions and scripts ---------------------------------------------------------------


def test_unknown_id_404_and_expired_410(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    unknown = {"endpoint": f"{fake.origin}/push/nosuchsubscription", "keys": sub["keys"]}
    response = push(unknown, "{}", session, vapid_key=vapid, claims={"sub": SUB})
    assert response.status_code == 404 and error(response)["errno"] == 102

    assert push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201
    fake.expire(sub["endpoint"])
    for _ in range(2):
        response = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB})
        assert response.status_code == 410 and error(response)["errno"] == 106
        assert response.headers["Cache-Control"] == "max-age=86400"
    # gone is checked before VAPID, like a missing id
    assert push(sub, "{}", session, headers={"TTL": "60"}).status_code == 410
    assert fake.sent_endpoints() == {sub["endpoint"]: 1}
    assert fake.statuses() == {201: 1, 404: 1, 410: 3}


def test_scripted_429_carries_retry_after_and_still_needs_valid_vapid(
    fake: WebPushFake, session: requests.Session, vapid: Vapid
):
    sub = fake.subscribe()
    fake.script(sub["endpoint"], [(429, "too many", 7), (429, "slow down", {"Retry-After": "2"}), (429, None),
                                  (503, "maintenance")])

    # a request failing a check is answered for that and does not consume the script
    bad = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB, "aud": "https://push.example.net"})
    assert bad.status_code == 401

    try:
        webpush(sub, "{}", vapid_private_key=vapid, vapid_claims={"sub": SUB}, ttl=60,
                requests_session=session, timeout=PUSH_TIMEOUT)
    except WebPushException as exc:
        assert exc.response.status_code == 429
        assert exc.response.headers["Retry-After"] == "7"
        assert error(exc.response)["message"] == "too many"
    else:
        pytest.fail("a scripted 429 was not raised by pywebpush")

    second = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB})
    assert second.status_code == 429 and second.headers["Retry-After"] == "2"
    third = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB})
    assert third.status_code == 429 and third.headers["Retry-After"] == str(fake.quota_retry_after)
    fourth = push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB})
    assert fourth.status_code == 503 and "Retry-After" not in fourth.headers
    assert push(sub, '{"n": 5}', session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201
    # scripted answers were judged first: their payload and claims are recorded too
    assert [r.status for r in fake.received] == [401, 429, 429, 429, 503, 201]
    assert all(r.payload == {} for r in fake.received[1:5]) and fake.received[-1].payload == {"n": 5}
    assert fake.sent_endpoints() == {sub["endpoint"]: 1}


def test_outage_default_and_other_paths(fake: WebPushFake, session: requests.Session, vapid: Vapid):
    sub = fake.subscribe()
    fake.set_default(503, "down")
    assert push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}).status_code == 503
    fake.set_default(None)
    assert push(sub, "{}", session, vapid_key=vapid, claims={"sub": SUB}).status_code == 201
    assert session.get(sub["endpoint"], timeout=PUSH_TIMEOUT).status_code == 405
    assert session.post(f"{fake.origin}/elsewhere", data=b"", timeout=PUSH_TIMEOUT).status_code == 404
    assert fake.wait_for(1, 1) and not fake.wait_for(2, 0.05)
    with pytest.raises(KeyError):
        fake.expire(f"{fake.origin}/push/unknown")
