"""The chat data the web layer owns: users, chats, members and their mute, messages.

A message is inserted together with its push job (notifier.enqueue) in the caller's
transaction, so a message and its pushes commit together or not at all.
"""
from __future__ import annotations

import functools
import hashlib
from typing import Iterable

import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from notifier import DriverStatement, Id, chats, enqueue, iso, members, messages, users


def hash_token(token: str) -> str:
    """The stored form of a bearer token: a SHA-256 hex digest (tokens are random, no salt needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _insert(conn: Connection, table: sa.Table):
    """A dialect insert, so ON CONFLICT DO NOTHING is available on both engines."""
    return (postgresql.insert if conn.dialect.name == "postgresql" else sqlite.insert)(table)


def create_user(conn: Connection, name: str, token_hash: str, now: float) -> dict:
    """Insert a user; return {"id", "name"}."""
    user_id = conn.execute(
        users.insert().values(name=name, token_hash=token_hash, created_at=now).returning(users.c.id)
    ).scalar_one()
    return {"id": user_id, "name": name}


def user_by_token_hash(conn: Connection, token_hash: str) -> dict | None:
    """The user owning this token hash, or None."""
    row = _statements(conn.dialect.name).user.first(conn, {"token_hash": token_hash})
    return row._asdict() if row else None


def caller_in_chat(conn: Connection, token_hash: str, chat_id: int):
    """In one statement: the user owning this token hash (None: unknown token), with `chat` (the
    chat exists) and `member` (the user belongs to it) set to 1 or None."""
    return _statements(conn.dialect.name).caller_in_chat.first(conn, {"token_hash": token_hash, "chat_id": chat_id})


def existing_user_ids(conn: Connection, ids: Iterable[int]) -> set[int]:
    """The subset of `ids` that are users."""
    ids = list(set(ids))
    if not ids:
        return set()
    return set(conn.execute(sa.select(users.c.id).where(users.c.id.in_(ids))).scalars())


def create_chat(conn: Connection, name: str, creator_id: int, member_ids: Iterable[int], now: float) -> int:
    """Insert a chat with its members (the creator included); return its id."""
    chat_id = conn.execute(
        chats.insert().values(name=name, creator_id=creator_id, created_at=now).returning(chats.c.id)
    ).scalar_one()
    ids = sorted({creator_id, *member_ids})
    conn.execute(members.insert(), [{"chat_id": chat_id, "user_id": uid, "joined_at": now} for uid in ids])
    return chat_id


def get_chat(conn: Connection, chat_id: int):
    """The chat row, or None."""
    return _statements(conn.dialect.name).chat.first(conn, {"chat_id": chat_id})


def chat_members(conn: Connection, chat_id: int) -> list[dict]:
    """Members of a chat as {"id", "name"}, in id order."""
    rows = conn.execute(
        sa.select(users.c.id, users.c.name).join(members, members.c.user_id == users.c.id)
        .where(members.c.chat_id == chat_id).order_by(users.c.id)
    )
    return [dict(row._mapping) for row in rows]


def is_member(conn: Connection, chat_id: int, user_id: int) -> bool:
    """Whether the user belongs to the chat."""
    return _statements(conn.dialect.name).is_member.first(conn, {"chat_id": chat_id, "sender_id": user_id}) is not None


def list_chats(conn: Connection, user_id: int) -> list[dict]:
    """Chats the user is a member of, oldest first."""
    rows = conn.execute(
        sa.select(chats.c.id, chats.c.name).join(members, members.c.chat_id == chats.c.id)
        .where(members.c.user_id == user_id).order_by(chats.c.id)
    )
    return [dict(row._mapping) for row in rows]


def add_member(conn: Connection, chat_id: int, user_id: int, now: float) -> bool:
    """Add a member; False when the user already was one."""
    result = conn.execute(
        _insert(conn, members).values(chat_id=chat_id, user_id=user_id, joined_at=now).on_conflict_do_nothing()
        .execution_options(preserve_rowcount=True)  # SQLAlchemy keeps an INSERT's rowcount only when asked
    )
    return result.rowcount == 1


def remove_member(conn: Connection, chat_id: int, user_id: int) -> bool:
    """Remove a member; False when the user was not one."""
    result = conn.execute(members.delete().where(members.c.chat_id == chat_id, members.c.user_id == user_id))
    return result.rowcount == 1


def set_muted_until(conn: Connection, chat_id: int, user_id: int, until: float | None) -> None:
    """Mute the member's pushes for this chat until `until` (None unmutes)."""
    conn.execute(
        members.update().where(members.c.chat_id == chat_id, members.c.user_id == user_id)
        .values(muted_until=until)
    )


def _message_dict(row) -> dict:
    return {
        "id": row.id, "chat_id": row.chat_id, "sender_id": row.sender_id, "text": row.text,
        "client_id": row.client_id, "created_at": iso(row.created_at),
    }


def message_by_client_id(conn: Connection, chat_id: int, sender_id: int, client_id: str) -> dict | None:
    """The message this sender already posted to this chat with this client_id, or None."""
    row = conn.execute(
        sa.select(messages).where(messages.c.chat_id == chat_id, messages.c.sender_id == sender_id,
                                  messages.c.client_id == client_id)
    ).first()
    return _message_dict(row) if row else None


def insert_message_with_job(conn: Connection, chat_id: int, sender_id: int, text: str,
                            client_id: str | None, now: float) -> dict | None:
    """Insert a message and its push job; the caller's transaction makes them one write.

    The write holds SQLite's write lock, so it does nothing else: the membership check is folded
    into the insert (a sender who left the chat meanwhile inserts nothing), and a client_id this
    sender already used in this chat is caught by its unique index (ON CONFLICT DO NOTHING).
    Returns the message, or None when nothing was inserted (the caller reads which of the two).
    """
    row = _statements(conn.dialect.name).insert_message.first(conn, {
        "chat_id": chat_id, "sender_id": sender_id, "text": text, "client_id": client_id, "created_at": now,
    })
    if row is None:
        return None
    enqueue(conn, row.id, now)
    return _message_dict(row)


class _Statements:
    """The request path's statements, built and compiled once per dialect and run on the driver
    (notifier.DriverStatement): per request they cost the driver's execute, not SQLAlchemy's."""

    def __init__(self, dialect: str):
        chat_id, sender_id = sa.bindparam("chat_id", type_=Id), sa.bindparam("sender_id", type_=Id)
        fast = DriverStatement
        self.user = fast(sa.select(users.c.id, users.c.name).where(users.c.token_hash == sa.bindparam("token_hash")))
        chat_exists = sa.select(sa.literal(1)).where(chats.c.id == chat_id).scalar_subquery()
        is_member = (sa.select(sa.literal(1)).where(members.c.chat_id == chat_id, members.c.user_id == users.c.id)
                     .scalar_subquery())
        self.caller_in_chat = fast(sa.select(users.c.id, users.c.name, chat_exists.label("chat"),
                                             is_member.label("member"))
                                   .where(users.c.token_hash == sa.bindparam("token_hash")))
        self.chat = fast(sa.select(chats).where(chats.c.id == chat_id))
        self.is_member = fast(sa.select(members.c.user_id).where(members.c.chat_id == chat_id,
                                                                  members.c.user_id == sender_id))
        self.history = {}
        for before in (False, True):
            for after in (False, True):  # newest first, unless `after` is given (then oldest first)
                query = sa.select(messages).where(messages.c.chat_id == chat_id)
                if before:
                    query = query.where(messages.c.id < sa.bindparam("before", type_=Id))
                if after:
                    query = query.where(messages.c.id > sa.bindparam("after", type_=Id))
                order = messages.c.id.asc() if after else messages.c.id.desc()
                self.history[(before, after)] = fast(query.order_by(order)
                                                     .limit(sa.bindparam("limit", type_=sa.Integer)))
        member = sa.exists().where(members.c.chat_id == chat_id, members.c.user_id == sender_id)
        values = sa.select(chat_id, sender_id, sa.bindparam("text", type_=sa.Text),
                           sa.bindparam("client_id", type_=sa.String), sa.bindparam("created_at", type_=sa.Double)
                           ).where(member)
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.insert_message = fast(insert(messages)
                                   .from_select(["chat_id", "sender_id", "text", "client_id", "created_at"], values)
                                   .on_conflict_do_nothing().returning(*messages.c))


@functools.cache
def _statements(dialect: str) -> _Statements:
    return _Statements(dialect)


def get_message(conn: Connection, message_id: int) -> dict | None:
    """The message, or None."""
    row = conn.execute(sa.select(messages).where(messages.c.id == message_id)).first()
    return _message_dict(row) if row else None


def list_messages(conn: Connection, chat_id: int, before: int | None, after: int | None, limit: int) -> list[dict]:
    """A page of history: newest first, unless `after` is given (then oldest first)."""
    query = _statements(conn.dialect.name).history[(before is not None, after is not None)]
    params = {"chat_id": chat_id, "before": before, "after": after, "limit": limit}
    return [_message_dict(row) for row in query.all(conn, params)]
