"""notifier.providers.h2client against a real HTTP/2 server over TLS on 127.0.0.1: the FCM fake's
h2 listener (its answers here are Google's 401 to a request without a valid OAuth token: any HTTP
answer will do for the transport)."""
from __future__ import annotations

import asyncio
import ssl

import pytest

from notifier.providers.h2client import (
    ConnectFailed,
    ConnectionLost,
    H2Client,
    RequestTimeout,
    http2_context,
)
from tests.fakes.fcm import FCMFake
from tests.harness import free_port

pytestmark = pytest.mark.timeout(60)
PATH = b"/v1/projects/test-project/messages:send"
HEADERS = [(b"content-type", b"application/json; UTF-8"), (b"authorization", b"Bearer not-a-token")]
BODY = b'{"message": {"token": "t"}}'


def client_for(fake: FCMFake, port: int | None = None, **kwargs) -> H2Client:
    context = http2_context(ssl.create_default_context(cafile=str(fake.tls.ca_cert)))
    return H2Client("127.0.0.1", port or fake.port_h2, context, **kwargs)


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 30))


def test_requests_are_multiplexed_on_at_most_max_connections(fcm_fake: FCMFake):
    async def scenario():
        client = client_for(fcm_fake, max_connections=2)
        try:
            responses = await asyncio.gather(*(client.request(b"POST", PATH, HEADERS, BODY) for _ in range(500)))
        finally:
            await client.close()
        return client, responses

    client, responses = run(scenario())
    assert {r.status for r in responses} == {401}
    assert all(r.headers[b"content-type"].startswith(b"application/json") for r in responses)
    assert all(b'"UNAUTHENTICATED"' in r.body for r in responses)
    assert 1 <= client.connections_opened <= 2
    assert fcm_fake.stats()["h2_connections"] == client.connections_opened


def test_the_servers_stream_limit_is_respected(tls_material):
    with FCMFake(tls_material, project_id="test-project", max_streams=10) as fake:
        async def scenario():
            client = client_for(fake, max_connections=1)
            try:
                return await asyncio.gather(*(client.request(b"POST", PATH, HEADERS, BODY) for _ in range(200)))
            finally:
                await client.close()

        responses = run(scenario())
        assert len(responses) == 200 and {r.status for r in responses} == {401}
        assert fake.refused_streams == 0
        assert fake.max_concurrent_seen <= 10


def test_a_request_without_an_answer_in_time_times_out_and_frees_its_stream(fcm_fake: FCMFake):
    async def scenario():
        client = client_for(fcm_fake, max_connections=1, max_streams=1)
        try:
            fcm_fake.delay = 3.0
            with pytest.raises(RequestTimeout) as caught:
                await client.request(b"POST", PATH, HEADERS, BODY, timeout=0.3)
            assert caught.value.sent  # it may have reached the server
            fcm_fake.delay = 0.0
            # the one stream allowed was given back: the next request goes through
            return await client.request(b"POST", PATH, HEADERS, BODY, timeout=10)
        finally:
            await client.close()

    assert run(scenario()).status == 401


def test_a_body_larger_than_the_flow_control_window_is_sent_whole(fcm_fake: FCMFake):
    body = b'{"message": {"token": "' + b"x" * 300_000 + b'"}}'  # > 64 KiB: waits for WINDOW_UPDATEs

    async def scenario():
        client = client_for(fcm_fake)
        try:
            return await client.request(b"POST", PATH, HEADERS, body, timeout=20)
        finally:
            await client.close()

    assert run(scenario()).status in (400, 401, 413)  # answered: the server read all of it


def test_nobody_listening_is_connect_failed_and_a_burst_fails_fast():
    context = http2_context(ssl.create_default_context())
    client = H2Client("127.0.0.1", free_port(), context, connect_timeout=5)

    async def scenario():
        try:
            return await asyncio.gather(*(client.request(b"POST", PATH, HEADERS, BODY) for _ in range(200)),
                                        return_exceptions=True)
        finally:
            await client.close()

    errors = run(scenario())
    assert all(isinstance(e, ConnectFailed) and not e.sent for e in errors)
    assert client.connections_opened == 0


def test_a_server_without_http2_is_connect_failed(fcm_fake: FCMFake):
    async def scenario():
        client = client_for(fcm_fake, port=fcm_fake.port)  # the HTTP/1.1 listener
        try:
            await client.request(b"POST", PATH, HEADERS, BODY)
        finally:
            await client.close()

    with pytest.raises(ConnectFailed, match="does not speak HTTP/2"):
        run(scenario())


def test_requests_in_flight_when_the_connection_drops_fail_and_the_dead_connection_is_not_reused(tls_material):
    fake = FCMFake(tls_material, project_id="test-project").start()
    try:
        async def scenario():
            client = client_for(fake, max_connections=1)
            try:
                fake.delay = 5.0
                pending = [asyncio.ensure_future(client.request(b"POST", PATH, HEADERS, BODY, timeout=20))
                           for _ in range(5)]
                await asyncio.sleep(0.5)
                await asyncio.to_thread(fake.stop)  # drops every connection, stops listening
                results = await asyncio.gather(*pending, return_exceptions=True)
                # the next request opens a new connection (and finds nobody listening)
                with pytest.raises(ConnectFailed):
                    await client.request(b"POST", PATH, HEADERS, BODY, timeout=5)
                return results
            finally:
                await client.close()

        results = run(scenario())
        assert all(isinstance(r, ConnectionLost) for r in results), results
    finally:
        fake.stop()


def test_the_encoders_reused_bytes_decode_to_the_same_headers_as_the_table_changes():
    """Constant fields are reused as encoded bytes; a field added or a resize must invalidate them
    (a new bearer token every 30 minutes moves every index). Decoded by hpack's own decoder."""
    import random

    from hpack import Decoder, NeverIndexedHeaderTuple

    from notifier.providers.h2client import PlainEncoder

    encoder, decoder = PlainEncoder(), Decoder()
    rng = random.Random(7)
    tokens = [b"Bearer " + bytes([65 + i]) * 300 for i in range(4)]  # big: evictions happen
    token = tokens[0]
    for request in range(400):
        if rng.random() < 0.05:
            token = rng.choice(tokens)
        if request == 200:
            encoder.header_table_size = 2048  # a resize announced mid-connection
        headers = [(b"content-type", b"application/json"), (b"authorization", token),
                   (b"apns-topic", rng.choice([b"com.example.a", b"com.example.b"])),
                   NeverIndexedHeaderTuple(b":path", f"/3/device/{request:064x}".encode()),
                   # never-indexed values around the one-byte length limit (126/127)
                   NeverIndexedHeaderTuple(b"apns-id", b"v" * rng.choice([0, 1, 126, 127, 128, 300]))]
        if rng.random() < 0.2:  # a never-indexed field whose name is in the dynamic table: its index moves
            headers.append(NeverIndexedHeaderTuple(b"authorization", rng.choice(tokens)))
        encoded = encoder.encode(headers)
        assert decoder.decode(encoded, raw=True) == [tuple(h) for h in headers]
        # the never-indexed fields never enter the decoder's table (RFC 7541 6.2.3)
        assert not any(name == b"apns-id" for name, _ in decoder.header_table.dynamic_entries)
