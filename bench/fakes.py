"""The protocol fakes of tests/fakes, each in its own process, with per-message timing marks.

A fake in the benchmark's own process would take the GIL from the load generator (and the
dispatcher's peer would share a core with it), so each runs in a child process:

    python -m bench.fakes apns|fcm|webpush --dir DIR --tls-dir DIR

The child prints one JSON line when ready (endpoint and the credentials the service needs),
then answers one JSON line per command read on stdin:

    {"cmd": "stats"}  -> counters, and per message id: [first answer, last answer, count] (time.time())
    {"cmd": "marks_reset"}
    {"cmd": "subscribe", "count": N}  (webpush only) -> {"file": PATH, "count": N}: N new browser
                      subscriptions, one PushSubscription.toJSON() per line of PATH (in --dir); their
                      private keys and auth secrets stay in the fake's process, which decrypts with them
    {"cmd": "quit"}   (also on EOF)

No request or payload is stored (the fakes run with record=False): only the marks.

Web Push: the fake is tests.fakes.webpush.WebPushFake, as strict as in the tests (VAPID JWT, TTL,
aes128gcm decrypted with the subscription's keys: one ECDH per push on this side too). A push is
marked under the message id of its `Topic` header (`msg-<id>`, notifier.payload.webpush_topic),
read without parsing the payload. The child also makes the VAPID key the service signs with
(`vapid.pem` in --dir): it is the service's credential, but like the APNs key it belongs to the
bench's scratch directory and travels in the ready line's env.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

from notifier.process import lower_priority

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "com.example.chat"
KEY_ID = "KEYID12345"
TEAM_ID = "TEAMID1234"
PROJECT = "chat-bench"
VAPID_SUBJECT = "mailto:bench@example.com"
FAKE_NICE = 10


class Marks:
    """First/last answer time and count per message id; thread-safe."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.by_message: dict = {}
        self.ok = 0

    def hit(self, message_id) -> None:
        now = time.time()
        with self.lock:
            self.ok += 1
            mark = self.by_message.get(message_id)
            if mark is None:
                self.by_message[message_id] = [now, now, 1]
            else:
                mark[1] = now
                mark[2] += 1

    def snapshot(self) -> dict:
        with self.lock:
            return {"ok": self.ok, "marks": {str(k): list(v) for k, v in self.by_message.items()}}

    def reset(self) -> None:
        with self.lock:
            self.by_message.clear()


# ------------------------------------------------------------------ parent side

class FakeProcess:
    """Start/stop a fake child and talk to it."""

    def __init__(self, kind: str, directory: Path, tls_dir: Path, max_streams: int = 1000):
        self.kind = kind
        self.directory = Path(directory)
        self.tls_dir = Path(tls_dir)
        self.max_streams = max_streams
        self.process: subprocess.Popen | None = None
        self.info: dict = {}
        self._lock = threading.Lock()

    def start(self) -> "FakeProcess":
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [sys.executable, "-m", "bench.fakes", self.kind, "--dir", str(self.directory),
             "--tls-dir", str(self.tls_dir), "--max-streams", str(self.max_streams)],
            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.directory / "stderr.log", "ab"),
            text=True, bufsize=1,
            start_new_session=True,  # a scheduler autogroup of its own, where its low priority counts
        )
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} fake did not start; see {self.directory / 'stderr.log'}")
        self.info = json.loads(line)
        return self

    @property
    def pid(self) -> int:
        return self.process.pid

    def call(self, cmd: str, **kwargs) -> dict:
        with self._lock:
            self.process.stdin.write(json.dumps({"cmd": cmd, **kwargs}) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.kind} fake died; see {self.directory / 'stderr.log'}")
        return json.loads(line)

    def stats(self) -> dict:
        return self.call("stats")

    def marks_reset(self) -> None:
        self.call("marks_reset")

    def subscribe(self, count: int) -> list[dict]:
        """Web Push: `count` new subscriptions of the fake's browsers (PushSubscription.toJSON() dicts:
        endpoint, keys.p256dh, keys.auth). They come through a file, not the pipe: 10,000 of them are
        2 MB, and the pipe carries one line per command."""
        reply = self.call("subscribe", count=count)
        if "error" in reply:
            raise RuntimeError(f"{self.kind} fake: {reply['error']}")
        with open(reply["file"]) as handle:
            subscriptions = [json.loads(line) for line in handle]
        os.unlink(reply["file"])
        return subscriptions

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(5)


# ------------------------------------------------------------------ child side

def _tls(tls_dir: Path):
    from tests.fakes.tls import TLSMaterial
    return TLSMaterial(directory=tls_dir, ca_cert=tls_dir / "ca.pem", server_cert=tls_dir / "server.pem",
                       server_key=tls_dir / "server.key")


def _short_frame_reprs() -> None:
    """Give hyperframe's frames a short repr, in this process only.

    h2 formats `repr(frame)` (flags sorted, body in hex) for a trace log on every frame it
    receives, even with its default no-op logger: 8% of the APNs fake's CPU per request. This
    process runs one fake, whose h2 logs nowhere, so a frame's repr is cut to its type and stream.
    """
    from hyperframe.frame import Frame

    def short_repr(frame) -> str:
        return f"{type(frame).__name__}(stream_id={frame.stream_id})"

    Frame.__repr__ = short_repr


def _start_apns(args, marks: Marks):
    from tests.fakes.apns import APNsFake
    from tests.fakes.tls import make_apns_key

    class MarkedAPNsFake(APNsFake):
        def _record_answer(self, conn, stream, verdict):
            super()._record_answer(conn, stream, verdict)
            if verdict.status == 200 and verdict.payload is not None:
                marks.hit(verdict.payload.get("message_id"))

    key_path, public_key = make_apns_key(args.dir / "apns-key", key_id=KEY_ID)
    _short_frame_reprs()
    # h2's generic checks of inbound header blocks are off (about a third of the fake's CPU): the
    # dispatcher's requests pass them in the tests; every APNs rule (auth, topic, token, limits) still applies
    fake = MarkedAPNsFake(_tls(args.tls_dir), topic=TOPIC, key_id=KEY_ID, team_id=TEAM_ID, public_key_pem=public_key,
                          max_streams=args.max_streams, record=False, validate_headers=False)
    fake.start()
    env = {"APNS_KEY_FILE": str(key_path), "APNS_KEY_ID": KEY_ID, "APNS_TEAM_ID": TEAM_ID, "APNS_TOPIC": TOPIC,
           "APNS_ENDPOINT": fake.endpoint}
    return fake, {"endpoint": fake.endpoint, "host": fake.host, "port": fake.port, "env": env,
                  "key_file": str(key_path), "key_id": KEY_ID, "team_id": TEAM_ID, "topic": TOPIC}


def _start_fcm(args, marks: Marks):
    from tests.fakes.fcm import FCMFake
    from tests.fakes.tls import make_service_account

    class MarkedFCMFake(FCMFake):
        def _record(self, request, token, status, sent):
            super()._record(request, token, status, sent)
            if sent and request is not None:
                marks.hit(int((request.message.get("data") or {}).get("message_id", 0)))

    fake = MarkedFCMFake(_tls(args.tls_dir), project_id=PROJECT, record=False)  # _record still gets the request
    fake.start()
    account_path, public_key = make_service_account(args.dir / "fcm-account", fake.token_uri, project_id=PROJECT)
    fake.add_service_account(json.loads(account_path.read_text())["client_email"], public_key)
    # the service and bench.ceiling's lean client both send over HTTP/2, as to Google's endpoint
    env = {"FCM_SERVICE_ACCOUNT_FILE": str(account_path), "FCM_PROJECT_ID": PROJECT,
           "FCM_ENDPOINT": fake.base_url_h2}
    return fake, {"endpoint": fake.base_url_h2, "host": fake.host, "port": fake.port, "env": env,
                  "port_h2": fake.port_h2,
                  "send_url": fake.send_url_h2(), "send_url_http1": fake.send_url(),
                  "account_file": str(account_path), "project": PROJECT}


def _topic_message_id(topic: str | None) -> int | None:
    """The message id of a Web Push `Topic: msg-<id>` header (None for another topic)."""
    if topic is not None and topic.startswith("msg-"):
        try:
            return int(topic[4:])
        except ValueError:
            return None
    return None


def _vapid_key(path: Path) -> Path:
    """A VAPID key for the service: PEM PKCS#8 EC P-256, as the README's openssl line makes one."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP256R1())
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))
    return path


def _start_webpush(args, marks: Marks):
    from tests.fakes.webpush import WebPushFake

    class MarkedWebPushFake(WebPushFake):
        def _record(self, record):
            super()._record(record)
            if 200 <= record.status < 300:
                # the Topic, not the decrypted payload: it is there for every push, even a payload the
                # fake would not parse as JSON, and costs no lookup in it
                marks.hit(_topic_message_id(record.headers.get("topic")))

        def stats(self):
            return {**super().stats(), "connections_opened": self.connections}  # named as the other fakes'

    fake = MarkedWebPushFake(_tls(args.tls_dir), record=False)
    fake.start()
    key_path = _vapid_key(args.dir / "vapid.pem")
    env = {"VAPID_PRIVATE_KEY_FILE": str(key_path), "VAPID_SUBJECT": VAPID_SUBJECT,
           "WEBPUSH_ALLOWED_HOSTS": f"{fake.host}:{fake.port}"}
    return fake, {"endpoint": fake.origin, "origin": fake.origin, "host": fake.host, "port": fake.port, "env": env,
                  "key_file": str(key_path), "subject": VAPID_SUBJECT}


_SUBSCRIPTION_FILES = itertools.count(1)


def _subscribe(fake, args, command: dict) -> dict:
    """Make subscriptions as browsers do (a P-256 key pair and an auth secret each, kept by the fake)
    and write their public halves to a file the parent reads (FakeProcess.subscribe)."""
    count = int(command.get("count", 0))
    path = args.dir / f"subscriptions-{next(_SUBSCRIPTION_FILES)}.jsonl"
    with open(path, "w") as handle:
        for _ in range(count):
            handle.write(json.dumps(fake.subscribe()) + "\n")
    return {"file": str(path), "count": count}


STARTERS = {"apns": _start_apns, "fcm": _start_fcm, "webpush": _start_webpush}
COMMANDS = {"webpush": {"subscribe": _subscribe}}  # commands only some fakes answer


def _main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fakes")
    parser.add_argument("kind", choices=tuple(STARTERS))
    parser.add_argument("--dir", type=Path, required=True)
    parser.add_argument("--tls-dir", type=Path, required=True)
    parser.add_argument("--max-streams", type=int, default=1000)
    args = parser.parse_args(argv)
    # the fakes stand in for Apple's and Google's servers, which do not share the service's CPU in
    # production: they take what the service under test leaves. In their own session (see start()),
    # so the autogroup's nice is lowered too, as the dispatcher does (notifier.process.lower_priority)
    lower_priority(FAKE_NICE)
    marks = Marks()
    fake, info = STARTERS[args.kind](args, marks)
    info["pid"] = os.getpid()
    print(json.dumps(info), flush=True)
    try:
        for line in sys.stdin:
            command = json.loads(line)
            cmd = command.get("cmd")
            if cmd == "stats":
                reply = {**fake.stats(), **marks.snapshot()}
            elif cmd == "marks_reset":
                marks.reset()
                reply = {"ok": True}
            elif cmd == "quit":
                print(json.dumps({"ok": True}), flush=True)
                break
            elif cmd in COMMANDS.get(args.kind, {}):
                reply = COMMANDS[args.kind][cmd](fake, args, command)
            else:
                reply = {"error": f"unknown command {cmd!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        fake.stop()
    return 0


if __name__ == "__main__":
    sys.exit(_main())
