"""Messages: posting (the push trigger, client_id retries), history pages, reading one, deliveries."""
import pytest
import sqlalchemy as sa

from chat_app.app import create_app
from chat_app import store
from notifier import db, outbox, schema
from notifier.model import DeliveryState
from tests.webapp import API_TIME, ContractTestApp, assert_error, row_counts

FIELDS = {"id", "chat_id", "sender_id", "text", "client_id", "created_at"}


def post(client, user, chat, status=201, **body):
    return client.post_json(f"/v1/chats/{chat['id']}/messages", body, headers=user.headers, status=status)


def jobs(engine):
    with engine.connect() as conn:
        return conn.execute(sa.select(schema.push_jobs).order_by(schema.push_jobs.c.id)).all()


@pytest.fixture
def pair(signup, make_chat):
    """ann and bob, and a chat of the two."""
    ann, bob = signup("ann"), signup("bob")
    return ann, bob, make_chat(ann, bob)


# ---------------------------------------------------------------- posting

def test_post_is_201_with_the_message_a_location_and_one_wake(app, app_engine, wakes, pair):
    ann, _, chat = pair

    res = post(app, ann, chat, text="hello")

    message = res.json
    assert set(message) == FIELDS
    assert message["chat_id"] == chat["id"]
    assert message["sender_id"] == ann.id
    assert (message["text"], message["client_id"]) == ("hello", None)
    assert API_TIME.match(message["created_at"])
    assert res.headers["Location"] == f"/v1/messages/{message['id']}"
    assert wakes == [True]
    job, = jobs(app_engine)
    assert (job.message_id, job.state) == (message["id"], "pending")


def test_text_of_4000_characters_and_client_id_of_64_are_accepted(app, pair):
    ann, _, chat = pair

    res = post(app, ann, chat, text="\U0001F600" * 4000, client_id="c" * 64)

    assert res.json["text"] == "\U0001F600" * 4000
    assert res.json["client_id"] == "c" * 64


def test_text_is_kept_exactly(app, pair):
    ann, _, chat = pair
    text = "  line one\n\tline two \u00e9\u4e2d "

    assert post(app, ann, chat, text=text).json["text"] == text


def test_retried_client_id_returns_first_message_and_no_second_wake(app, app_engine, wakes, pair):
    ann, _, chat = pair
    first = post(app, ann, chat, text="hello", client_id="c-1")

    retry = post(app, ann, chat, status=200, text="hello again", client_id="c-1")

    assert retry.json == first.json
    assert retry.headers["Location"] == f"/v1/messages/{first.json['id']}"
    assert wakes == [True]
    assert len(jobs(app_engine)) == 1


def test_same_client_id_from_another_sender_gets_a_new_message(app, wakes, pair):
    ann, bob, chat = pair
    anns = post(app, ann, chat, text="hi", client_id="same").json

    bobs = post(app, bob, chat, status=201, text="hi", client_id="same").json

    assert bobs["id"] != anns["id"]
    assert bobs["sender_id"] == bob.id
    assert wakes == [True, True]


def test_same_client_id_in_another_chat_gets_a_new_message(app, make_chat, pair):
    ann, bob, chat = pair
    other = make_chat(ann, bob, name="other")
    first = post(app, ann, chat, text="hi", client_id="same").json

    second = post(app, ann, other, status=201, text="hi", client_id="same").json

    assert second["id"] != first["id"]
    assert second["chat_id"] == other["id"]


def test_without_client_id_every_post_is_a_new_message(app, wakes, pair):
    ann, _, chat = pair

    one = post(app, ann, chat, text="same").json
    two = post(app, ann, chat, text="same", client_id=None).json

    assert one["id"] != two["id"]
    assert wakes == [True, True]


def test_a_failing_wake_up_still_answers_201_and_keeps_the_job(app_settings):
    def broken_wake():
        raise OSError("no dispatcher")

    client = ContractTestApp(create_app(app_settings, wake=broken_wake))
    engine = client.app.config["chat.context"].engine
    body = client.post_json("/v1/users", {"name": "ann"}).json
    headers = {"Authorization": f"Bearer {body['token']}"}
    chat = client.post_json("/v1/chats", {"name": "c", "member_ids": []}, headers=headers).json

    res = client.post_json(f"/v1/chats/{chat['id']}/messages", {"text": "hi"}, headers=headers, status=201)

    assert [job.message_id for job in jobs(engine)] == [res.json["id"]]


def test_a_non_member_cannot_post_and_nothing_is_written(app, app_engine, wakes, signup, pair):
    _, _, chat = pair
    eve = signup("eve")
    before = row_counts(app_engine)

    res = app.post_json(f"/v1/chats/{chat['id']}/messages", {"text": "hi"}, headers=eve.headers,
                        expect_errors=True)

    assert_error(res, 403, "forbidden")
    assert row_counts(app_engine) == before
    assert wakes == []


def test_posting_to_an_unknown_chat_is_404(app, wakes, pair):
    ann, _, _ = pair

    res = app.post_json("/v1/chats/999/messages", {"text": "hi"}, headers=ann.headers, expect_errors=True)

    assert_error(res, 404, "not_found")
    assert wakes == []


@pytest.mark.parametrize("body, field", [
    ({}, "text"),
    ({"text": None}, "text"),
    ({"text": ""}, "text"),
    ({"text": "  \n\t "}, "text"),
    ({"text": "x" * 4001}, "text"),
    ({"text": 42}, "text"),
    ({"text": True}, "text"),
    ({"text": ["hi"]}, "text"),
    ({"text": {"body": "hi"}}, "text"),
    ({"text": "nul \u0000 inside"}, "text"),
    ({"client_id": "c-1"}, "text"),
    ({"text": "hi", "client_id": ""}, "client_id"),
    ({"text": "hi", "client_id": "   "}, "client_id"),
    ({"text": "hi", "client_id": "c" * 65}, "client_id"),
    ({"text": "hi", "client_id": 7}, "client_id"),
    ({"text": "hi", "client_id": ["c"]}, "client_id"),
    ({"text": "hi", "client_id": False}, "client_id"),
], ids=lambda value: repr(value)[:40])
def test_a_bad_message_is_400_and_writes_neither_message_nor_job(app, app_engine, wakes, pair, body, field):
    ann, _, chat = pair
    before = row_counts(app_engine)

    res = app.post_json(f"/v1/chats/{chat['id']}/messages", body, headers=ann.headers, expect_errors=True)

    assert_error(res, 400, "invalid_field", field)
    assert row_counts(app_engine) == before
    assert wakes == []


# ---------------------------------------------------------------- reading

def test_a_member_reads_a_message(app, pair):
    ann, bob, chat = pair
    message = post(app, ann, chat, text="hello", client_id="x").json

    assert app.get(f"/v1/messages/{message['id']}", headers=bob.headers, status=200).json == message


def test_a_non_member_cannot_read_a_message(app, signup, pair):
    ann, _, chat = pair
    message = post(app, ann, chat, text="secret").json

    res = app.get(f"/v1/messages/{message['id']}", headers=signup("eve").headers, expect_errors=True)

    assert_error(res, 403, "forbidden")


@pytest.mark.parametrize("message_id", ["999", "0", str(2**63), str(2**70), "7" * 5000])
def test_an_unknown_message_is_404(app, pair, message_id):
    ann, _, _ = pair

    assert_error(app.get(f"/v1/messages/{message_id}", headers=ann.headers, expect_errors=True), 404, "not_found")
    assert_error(app.get(f"/v1/messages/{message_id}/deliveries", headers=ann.headers, expect_errors=True),
                 404, "not_found")


# ---------------------------------------------------------------- history

@pytest.fixture
def history(app, pair):
    """Ten messages in the chat of the pair (ids ascending), and one in another chat."""
    ann, bob, chat = pair
    posted = [post(app, (ann, bob)[i % 2], chat, text=f"m{i}").json for i in range(10)]
    other = app.post_json("/v1/chats", {"name": "other", "member_ids": []}, headers=ann.headers).json
    post(app, ann, other, text="elsewhere")
    return posted


def page(client, user, chat, query="", status=200):
    return client.get(f"/v1/chats/{chat['id']}/messages{query}", headers=user.headers, status=status)


def test_history_is_newest_first_by_default(app, pair, history):
    ann, _, chat = pair

    assert page(app, ann, chat).json == {"messages": history[::-1]}


def test_history_before_an_id_is_newest_first(app, pair, history):
    ann, _, chat = pair

    res = page(app, ann, chat, f"?before={history[5]['id']}&limit=3")

    assert res.json["messages"] == [history[4], history[3], history[2]]


def test_history_after_an_id_is_oldest_first(app, pair, history):
    ann, _, chat = pair

    res = page(app, ann, chat, f"?after={history[5]['id']}&limit=3")

    assert res.json["messages"] == [history[6], history[7], history[8]]


def test_history_between_after_and_before(app, pair, history):
    ann, _, chat = pair

    res = page(app, ann, chat, f"?after={history[2]['id']}&before={history[6]['id']}")

    assert res.json["messages"] == [history[3], history[4], history[5]]


def test_history_pages_walk_back_to_the_start(app, pair, history):
    ann, _, chat = pair
    seen, query = [], "?limit=4"
    while True:
        messages = page(app, ann, chat, query).json["messages"]
        if not messages:
            break
        seen += messages
        query = f"?limit=4&before={messages[-1]['id']}"

    assert seen == history[::-1]


@pytest.mark.parametrize("limit, count", [("1", 1), ("200", 10), ("010", 10)])
def test_history_limit_bounds(app, pair, history, limit, count):
    ann, _, chat = pair

    assert len(page(app, ann, chat, f"?limit={limit}").json["messages"]) == count


def test_history_default_limit_is_50(app, pair):
    ann, _, chat = pair
    with app.app.config["chat.context"].engine.begin() as conn:
        for i in range(60):
            store.insert_message_with_job(conn, chat["id"], ann.id, f"m{i}", None, 1_000_000 + i)

    messages = page(app, ann, chat).json["messages"]

    assert [m["text"] for m in messages] == [f"m{i}" for i in range(59, 9, -1)]


def test_history_of_an_empty_chat_is_an_empty_list(app, pair):
    ann, _, chat = pair

    assert page(app, ann, chat).json == {"messages": []}


@pytest.mark.parametrize("query, field", [
    ("?limit=0", "limit"), ("?limit=201", "limit"), ("?limit=abc", "limit"), ("?limit=-1", "limit"),
    ("?limit=1.5", "limit"), ("?limit=", "limit"), ("?limit=%C2%B2", "limit"), ("?limit=%B2", "limit"),
    ("?limit=" + "9" * 5000, "limit"),
    ("?before=abc", "before"), ("?before=-1", "before"), ("?before=1e3", "before"), ("?before=", "before"),
    (f"?before={2**63}", "before"), (f"?before={2**70}", "before"),
    ("?before=" + "9" * 5000, "before"),
    ("?before=%B2", "before"), ("?after=x", "after"), (f"?after={2**70}", "after"),
])
def test_bad_history_parameters_are_400_invalid_field(app, pair, query, field):
    ann, _, chat = pair

    assert_error(page(app, ann, chat, query, status="*"), 400, "invalid_field", field)


def test_a_non_member_cannot_read_the_history(app, signup, pair, history):
    _, _, chat = pair

    assert_error(page(app, signup("eve"), chat, status="*"), 403, "forbidden")


# ---------------------------------------------------------------- deliveries

@pytest.fixture
def devices(app, pair):
    """bob has an APNs and an FCM device; ann (the sender) has one too."""
    ann, bob, _ = pair
    for user, platform, token in ((bob, "apns", "ab" * 32), (bob, "fcm", "bob-fcm"), (ann, "fcm", "ann-fcm")):
        app.post_json("/v1/devices", {"platform": platform, "token": token}, headers=user.headers, status=201)


def expand_jobs(engine, now=2_000_000_000.0):
    with db.writer(engine).begin() as conn:
        outbox.expand_pending_jobs(conn, now)


def test_deliveries_of_a_message_not_yet_expanded_are_incomplete_and_zero(app, pair, devices):
    ann, _, chat = pair
    message = post(app, ann, chat, text="hi").json

    res = app.get(f"/v1/messages/{message['id']}/deliveries", headers=ann.headers, status=200)

    assert res.json == {"message_id": message["id"], "complete": False,
                        "summary": {"pending": 0, "sent": 0, "failed": 0, "skipped": 0}, "deliveries": [],
                        "pruned": False}


def test_expanded_deliveries_appear_as_pending(app, app_engine, pair, devices):
    ann, bob, chat = pair
    message = post(app, ann, chat, text="hi").json
    bobs = app.get("/v1/devices", headers=bob.headers).json["devices"]

    expand_jobs(app_engine)
    res = app.get(f"/v1/messages/{message['id']}/deliveries", headers=ann.headers, status=200)

    assert res.json["complete"] is False
    assert res.json["summary"] == {"pending": 2, "sent": 0, "failed": 0, "skipped": 0}
    assert res.json["deliveries"] == [
        {"device_id": device["id"], "platform": device["platform"], "state": "pending", "attempts": 0,
         "last_status": None, "last_reason": None, "sent_at": None}
        for device in bobs
    ]


def test_deliveries_are_complete_once_all_are_final(app, app_engine, pair, devices):
    ann, _, chat = pair
    message = post(app, ann, chat, text="hi").json
    expand_jobs(app_engine)
    now = 2_000_000_000.0
    with db.writer(app_engine).begin() as conn:
        first, second = outbox.claim_deliveries(conn, "test", now, lease=60, limit=10)
        outbox.record_updates(conn, "test", [
            outbox.Update(first.push.delivery_id, DeliveryState.SENT, 1, now, 200, None, sent_at=now),
            outbox.Update(second.push.delivery_id, DeliveryState.FAILED, 1, now, 410, "Unregistered"),
        ])

    res = app.get(f"/v1/messages/{message['id']}/deliveries", headers=ann.headers, status=200)

    assert res.json["complete"] is True
    assert res.json["summary"] == {"pending": 0, "sent": 1, "failed": 1, "skipped": 0}
    sent, failed = res.json["deliveries"]
    assert (sent["state"], sent["attempts"], sent["last_status"]) == ("sent", 1, 200)
    assert API_TIME.match(sent["sent_at"])
    assert (failed["state"], failed["last_status"], failed["last_reason"], failed["sent_at"]) == (
        "failed", 410, "Unregistered", None)


def test_a_message_to_nobody_is_complete_once_expanded(app, app_engine, signup, make_chat):
    ann = signup()
    chat = make_chat(ann)
    message = post(app, ann, chat, text="note to self").json

    expand_jobs(app_engine)
    res = app.get(f"/v1/messages/{message['id']}/deliveries", headers=ann.headers, status=200)

    assert res.json["complete"] is True
    assert res.json["deliveries"] == []


def test_only_the_sender_sees_deliveries(app, signup, pair):
    ann, bob, chat = pair
    message = post(app, ann, chat, text="hi").json

    for user in (bob, signup("eve")):
        res = app.get(f"/v1/messages/{message['id']}/deliveries", headers=user.headers, expect_errors=True)
        assert_error(res, 403, "forbidden")
